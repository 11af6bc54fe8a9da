"""Dependencies between the packages run one way, read from every import statement (function-local ones included):

    modeling <- configs <- data (tasks, documents) <- evaluation <- recipes <- hybridzoo glue (CLI, hub, convert,
    model card) <- hybridzoo.testing (the local Hub server) <- quickstart and the `hybridzoo_cli` entry point

Evaluation scores models and recipes make them: a recipe may score what it trains (the distillation report runs the
eval harness), the harness never trains through a recipe.

A module may import its own layer and the ones below it, never one above. `modeling/` imports nothing of hybridzoo at
all (it is the remote code shipped with every saved model). The bare package (`import hybridzoo`, `from hybridzoo
import HybridConfig`: the registration in `hybridzoo/__init__.py`) counts as no layer and is allowed everywhere else.
"""

import ast
import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a dotted module name maps to the layer of its longest listed prefix
LAYERS = [
    ("modeling", ["hybridzoo.modeling"]),
    ("configs", ["hybridzoo.configs"]),
    ("data", ["hybridzoo.data"]),
    ("evaluation", ["hybridzoo.evaluation"]),
    ("recipes", ["hybridzoo.recipes"]),
    ("glue", ["hybridzoo.cli", "hybridzoo.hub", "hybridzoo.convert", "hybridzoo.model_card"]),
    ("testing", ["hybridzoo.testing"]),
    ("top", ["hybridzoo.quickstart", "hybridzoo_cli"]),
]
ROOT_PACKAGE = "hybridzoo"
# (importer, imported) pairs still going upwards, each with what removes it; the test fails once one is gone, so the
# list only shrinks
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int | None:
    """The layer rank of a dotted module name; None for the bare package and for anything outside hybridzoo."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in RANK:
            return RANK[prefix]
    if module == ROOT_PACKAGE or module in ("hybridzoo.__init__",):
        return None
    if parts[0] == ROOT_PACKAGE:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return None


def package_folders() -> dict[str, Path]:
    """Each package of the distribution and its folder, as setup.cfg maps them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = config["options"]["packages"].split()
    mapping = dict(line.split(" = ") for line in config["options"]["package_dir"].strip().splitlines())
    folders = {}
    for package in packages:
        if package in mapping:
            folders[package] = ROOT / mapping[package]
        else:  # a subpackage under its parent's folder
            parent, _, name = package.rpartition(".")
            folders[package] = folders[parent] / name
    return folders


def modules() -> dict[str, Path]:
    """Every module of the distribution (dotted name -> file), the `hybridzoo_cli` entry point included."""
    found = {"hybridzoo_cli": ROOT / "hybridzoo_cli.py"}
    folders = package_folders()
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if any(f"{package}.{'.'.join(relative.parts[:i])}" in folders for i in range(1, len(relative.parts))):
                continue  # belongs to a listed subpackage, found there
            name = ".".join((package, *relative.parts))
            found[name.removesuffix(".__init__") if relative.name == "__init__" else name] = path
    return found


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every hybridzoo module `source` imports; `from X import name` counts X.name when that
    is a module (a file or folder of the distribution), else X."""
    known = set(modules())
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return [(line, name) for line, name in found if name.split(".")[0] in (ROOT_PACKAGE, "hybridzoo_cli")]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    problems = []
    for line, name in imported_modules(source, module, is_package):
        target = layer_of(name)
        if own == RANK["hybridzoo.modeling"] and not name.startswith("hybridzoo.modeling"):
            problems.append(f"{module}:{line} imports {name}: modeling/ must depend only on torch + transformers")
        elif target is not None and own is not None and target > own and (module, name) not in KNOWN_UPWARD:
            problems.append(f"{module}:{line} imports {name}, a layer above it ({LAYERS[target][0]} > "
                            f"{LAYERS[own][0]})")
    return problems


def test_every_package_is_in_a_layer():
    for package in package_folders():
        if package != ROOT_PACKAGE:
            assert layer_of(package) is not None, f"{package} is in no layer: add it to LAYERS"


def test_imports_run_one_way():
    problems = []
    for module, path in sorted(modules().items()):
        problems += violations(path.read_text(), module, is_package=path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


def test_known_upward_imports_are_still_there():
    found = modules()
    for module, target in KNOWN_UPWARD:
        imported = {name for _, name in imported_modules(found[module].read_text(), module, False)}
        assert target in imported, f"{module} no longer imports {target}: remove it from KNOWN_UPWARD"


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("hybridzoo.data.tasks", "def f():\n    from hybridzoo.recipes.data import prepare_data\n", True),
        ("hybridzoo.evaluation.harness", "from ..data.tasks import make_task\n", False),
        ("hybridzoo.evaluation.harness", "from hybridzoo.recipes.trainer import train\n", True),
        ("hybridzoo.recipes.trainer", "from hybridzoo.convert import convert_state_dict\n", True),
        ("hybridzoo.evaluation.harness", "from .. import hub\n", True),
        ("hybridzoo.model_card", "from hybridzoo.testing.local_hub import LocalHub\n", True),
        ("hybridzoo.quickstart", "from hybridzoo.testing.local_hub import LocalHub\n", False),
        ("hybridzoo.configs.zoo", "from hybridzoo import HybridConfig\n", False),
        ("hybridzoo.modeling.blocks", "from hybridzoo import HybridConfig\n", True),
        ("hybridzoo.modeling.blocks", "from .block_base import BlockSpec\n", False),
    ],
)
def test_the_check_sees_upward_imports(module, source, bad):
    """The checker itself, on made-up sources: a function-local or relative import upwards is caught."""
    assert bool(violations(source, module)) is bad


def import_circle(graph: dict[str, set[str]]) -> list[str]:
    """A circle of imports in `graph` (module -> modules it imports), or [] when there is none."""
    done, on_path = set(), []

    def visit(module: str) -> list[str]:
        if module in on_path:
            return on_path[on_path.index(module):] + [module]
        if module in done:
            return []
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            if circle := visit(target):
                return circle
        on_path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if circle := visit(module):
            return circle
    return []


def test_no_modules_import_each_other():
    """Within a layer too, imports form no circle (as `evaluation/harness.py` and `compare.py` once did); the bare
    package is left out, since every submodule import runs it first anyway."""
    found = modules()
    graph = {module: {name for _, name in imported_modules(path.read_text(), module, path.name == "__init__.py")
                      if name in found and name not in (ROOT_PACKAGE, module)}
             for module, path in found.items()}
    assert import_circle(graph) == []


def test_the_circle_check_sees_a_circle():
    graph = {"harness": {"plots", "compare"}, "compare": {"metrics", "harness"}, "metrics": set(), "plots": set()}
    assert import_circle(graph) == ["compare", "harness", "compare"]
    graph["harness"].discard("compare")
    assert import_circle(graph) == []
