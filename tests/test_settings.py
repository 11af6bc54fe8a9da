"""Settings declared once (configs/settings.py): every command's options are its settings dataclass's fields, with
checks, "did you mean" and help generated from them; the Python functions behind the commands take the same settings.

The per-command tests run over `SUBCOMMANDS`, so a new command that types an option by hand (or has no settings class)
fails them; the expected values (flags, messages, parsed values) are written out here, not read from the module."""

import argparse
import ast
import inspect
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from hybridzoo.cli import SUBCOMMANDS, build_parser
from hybridzoo.configs.settings import (
    MISSING,
    SettingsError,
    SettingsParser,
    add_command,
    at_least,
    build,
    default_of,
    describe,
    flag_of,
    format_value,
    help_of,
    setting,
    takes_settings,
    type_name,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# the machinery, on a made-up command


@dataclass
class Toy:
    """A command with one field of every kind the command line supports."""

    source: str = setting(help="where from", positional=True)
    steps: int = setting(10, "optimizer steps", check=at_least(1), aliases=("max_iters",))
    lr: float = setting(1e-3, "learning rate: 100% of it")
    mode: str = setting("fast", "how", choices=("fast", "careful"))
    widths: list[int] = setting([64, 128], "model widths")
    slices: list[tuple[int, int]] = setting([(64, 8)], "seq_len:kv pairs", flag="--grid")
    note: str | None = setting(None, "a note")
    verbose: bool = setting(False, "say more")
    plot: bool = setting(True, "draw the plot")
    names: list[str] = setting([], "names", positional=True)


@dataclass
class Commented:
    size: int = 3  # how big (the comment is the help)
    prompt: str = "# "  # a '#' in the value is not the comment
    bare: str = "x"


def toy_parser(run=lambda settings: settings) -> argparse.ArgumentParser:
    parser = SettingsParser(prog="toy")
    add_command(parser, Toy, run)
    return parser


def test_command_line_values_are_parsed_by_type():
    parser = toy_parser()
    args = parser.parse_args(["src", "a", "b", "--steps", "5", "--lr", "0.5", "--mode", "careful", "--widths", "32",
                              "--grid", "16:2", "32:4", "--verbose", "--no-plot"])
    settings = args.handler(args)
    assert settings == Toy(source="src", steps=5, lr=0.5, mode="careful", widths=[32], slices=[(16, 2), (32, 4)],
                           note=None, verbose=True, plot=False, names=["a", "b"])
    args = parser.parse_args(["src"])
    assert args.handler(args) == Toy(source="src")
    assert Toy(source="x").widths is not Toy(source="x").widths  # a mutable default is copied per instance


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["src", "--stpes", "3"], "unrecognized argument --stpes; did you mean --steps?"),
        (["src", "--verbsoe"], "unrecognized argument --verbsoe; did you mean --verbose?"),
        (["src", "--grdi=16:2"], "unrecognized argument --grdi=16:2; did you mean --grid?"),
        (["src", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["src", "--grid", "16-2"], "argument --grid: write 2 values (int, int) joined by ':', e.g. 64:8; got '16-2'"),
        (["src", "--mode", "quick"], "argument --mode: invalid choice: 'quick' (choose from 'fast', 'careful')"),
        (["src", "--mode", "carefull"], "argument --mode: invalid choice: 'carefull'; did you mean 'careful'?"),
        (["src", "--steps", "0"], "--steps: use at least 1, got 0."),
    ],
)
def test_command_line_mistakes_name_the_flag_and_the_fix(argv, expected, capsys):
    parser = toy_parser()
    with pytest.raises(SystemExit) as exit:
        args = parser.parse_args(argv)
        args.handler(args)
    assert exit.value.code == 2
    assert expected in capsys.readouterr().err


def test_help_shows_every_field_with_its_default():
    text = " ".join(toy_parser().format_help().split())
    for expected in ("source where from", "--steps STEPS optimizer steps (default: 10)",
                     "learning rate: 100% of it (default: 0.001)", "--mode {fast,careful} how (default: fast)",
                     "model widths (default: 64 128)", "--grid GRID [GRID ...] seq_len:kv pairs (default: 64:8)",
                     "a note (default: none)", "--verbose say more (default: off)",
                     "--no-plot draw the plot (default: on)", "names (default: none)"):
        assert expected in text


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"source": "s", "stpes": 3}, "stpes: unknown key; did you mean `steps`?"),
        ({"source": "s", "max_iters": 3}, "max_iters: unknown key; did you mean `steps`?"),
        ({"source": "s", "zzz": 3}, "zzz: unknown key; known keys: source, steps, lr,"),
        ({"source": "s", "steps": "ten"}, "steps: expected int, got 'ten' (str)."),
        ({"source": "s", "steps": True}, "steps: expected int, got True (bool)."),
        ({"source": "s", "note": 3}, "note: expected str or null, got 3 (int)."),
        ({"source": "s", "slices": [[64, 8, 1]]}, "slices: expected list[tuple[int, int]], got [(64, 8, 1)]"),
        ({"source": "s", "mode": "carefull"}, "mode: 'carefull' is not one of fast, careful; did you mean 'careful'?"),
        ({"source": "s", "steps": 0}, "steps: use at least 1, got 0."),
        ({"steps": 3}, "source: required key is missing"),
    ],
)
def test_building_names_the_key_and_the_fix(values, expected):
    with pytest.raises(SettingsError) as error:
        build(Toy, values)
    assert expected in str(error.value)


def test_building_converts_only_losslessly():
    settings = build(Toy, {"source": "s", "lr": 1, "slices": [[16, 2]], "widths": [8]})
    assert settings.lr == 1.0 and isinstance(settings.lr, float)
    assert settings.slices == [(16, 2)]  # YAML and JSON have no tuples
    assert build(Toy, {"source": "s", "lr": "3e-4"}).lr == 3e-4  # YAML 1.1 reads 3e-4 as a string


def test_help_falls_back_to_the_comment_on_the_fields_line():
    assert describe(Commented) == ["size (int, default 3): how big (the comment is the help)",
                                   "prompt (str, default \"# \"): a '#' in the value is not the comment",
                                   "bare (str, default \"x\")"]


def test_a_function_takes_the_settings_or_their_fields():
    @takes_settings(Toy)
    def run(settings: Toy, log: list | None = None) -> Toy:
        if log is not None:
            log.append(settings.steps)
        return settings

    log = []
    assert run("s", 5, log=log) == Toy(source="s", steps=5) and log == [5]
    assert run(Toy(source="s", mode="careful")).mode == "careful"
    assert run(source="s", lr=2).lr == 2.0
    with pytest.raises(SettingsError, match="stpes: unknown key; did you mean `steps`"):
        run("s", stpes=5)
    with pytest.raises(SettingsError, match="steps: expected int"):
        run(Toy(source="s", steps="5"))  # an object built directly is checked too
    with pytest.raises(TypeError, match="several values for 'source'"):
        run("s", source="t")
    assert list(inspect.signature(run).parameters)[:3] == ["source", "steps", "lr"]
    assert inspect.signature(run).parameters["log"].kind is inspect.Parameter.KEYWORD_ONLY


# ---------------------------------------------------------------------------------------------------------------------
# every command of `hybridzoo`


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return choices[name]


def settings_class(name: str) -> type:
    cls = subparser(name).get_default("settings_class")
    assert cls is not None, f"`hybridzoo {name}` declares no settings class (configs/settings.py: add_command)"
    return cls


def options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    return {a.dest: a.option_strings or [a.dest] for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def mistyped(flag: str) -> str:
    """`--steps` -> `--stepx`: one letter off at the end, so it is no prefix argparse would accept."""
    return flag[:-1] + ("q" if flag.endswith("x") else "x")


def minimal_argv(name: str, cls: type) -> list[str]:
    """The command with a value for each required argument (not checked: parsing stops at the mistake first)."""
    argv = [name]
    for f in fields(cls):
        if default_of(f) is MISSING:
            argv += ["1"] if f.metadata.get("positional") else [flag_of(f), "1"]
    return argv


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_the_options_are_the_settings_fields(name):
    cls = settings_class(name)
    assert options(subparser(name)) == {f.name: [flag_of(f)] for f in fields(cls)}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_lists_every_field_with_its_default(name):
    parser, cls = subparser(name), settings_class(name)
    text = "".join(parser.format_help().split())  # help is wrapped at spaces and hyphens
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        f = next(f for f in fields(cls) if f.name == action.dest)
        assert action.help, f"{name}: {action.dest} has no help"
        assert all(flag in text for flag in action.option_strings)
        assert "".join((action.help % {}).split()) in text  # the field's help, its default included
        if default_of(f) is MISSING:
            continue
        if "(default" in help_of(cls, f):
            assert "(default" in action.help  # the help says it in words
        else:
            assert "".join(f"(default: {format_value(default_of(f))})".split()) in text, f"{name} {action.dest}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_a_mistyped_flag_gets_did_you_mean(name, capsys):
    cls = settings_class(name)
    flags = [flag_of(f) for f in fields(cls) if not f.metadata.get("positional")]
    for flag in flags:
        with pytest.raises(SystemExit) as exit:
            build_parser(name).parse_args([*minimal_argv(name, cls), mistyped(flag)])
        assert exit.value.code == 2
        assert f"unrecognized argument {mistyped(flag)}; did you mean {flag}?" in capsys.readouterr().err


def test_a_mistyped_required_flag_gets_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        build_parser("push").parse_args(["push", "folder", "--repo_id", "me/model"])
    assert ("the following arguments are required: --repo-id (unrecognized argument --repo_id: did you mean "
            "--repo-id?)") in capsys.readouterr().err


def test_a_mistyped_command_gets_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["comapre"])
    assert "invalid choice: 'comapre'; did you mean 'compare'?" in capsys.readouterr().err


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_a_wrong_type_on_the_command_line_names_the_flag_and_the_type(name, capsys):
    cls = settings_class(name)
    numeric = [a for a in subparser(name)._actions if a.type in (int, float) and a.option_strings]
    for action in numeric:
        with pytest.raises(SystemExit):
            build_parser(name).parse_args([*minimal_argv(name, cls), action.option_strings[0], "ten"])
        expected = f"argument {action.option_strings[0]}: invalid {action.type.__name__} value: 'ten'"
        assert expected in capsys.readouterr().err


def python_functions():
    import hybridzoo.recipes.distillation  # noqa: F401  (the submodule must not shadow the package's `distill`)
    from hybridzoo.convert import convert_checkpoint, export_checkpoint
    from hybridzoo.evaluation.harness import run_eval
    from hybridzoo.hub import push_to_hub
    from hybridzoo.quickstart import run_quickstart
    from hybridzoo.recipes import distill, train
    from hybridzoo.recipes.compare import compare

    return {"compare": compare, "eval": run_eval, "quickstart": run_quickstart, "push": push_to_hub,
            "convert": convert_checkpoint, "export": export_checkpoint, "train": train, "distill": distill}


@pytest.mark.parametrize("name", ["compare", "eval", "quickstart", "push", "convert", "export", "train", "distill"])
def test_the_python_function_takes_the_same_settings(name):
    """Each command's Python function has the settings' fields as its parameters, and checks them the same way
    (the mistake is caught before any work starts)."""
    function, cls = python_functions()[name], settings_class(name)
    assert list(inspect.signature(function).parameters)[:len(fields(cls))] == [f.name for f in fields(cls)]
    first = next(f for f in fields(cls) if default_of(f) is not MISSING)
    with pytest.raises(SettingsError, match=f"{first.name}x: unknown key; did you mean `{first.name}`"):
        function(**{first.name + "x": default_of(first)})
    with pytest.raises(SettingsError) as error:
        function(**{first.name: 3.5j})
    assert f"{first.name}: expected {type_name(typing.get_type_hints(cls)[first.name])}, got 3.5j (complex)" in str(
        error.value)


def test_train_help_lists_every_recipe_key():
    from hybridzoo.recipes.recipe import Recipe

    for name in ("train", "distill"):
        text = subparser(name).format_help()
        for line in describe(Recipe):
            assert line in text
    assert "train.lr (float, default 0.001)" in subparser("train").format_help()


def test_no_option_is_typed_by_hand():
    """Only configs/settings.py calls argparse's `add_argument`; every command (and the local Hub server's `main`)
    gets its options from its settings."""
    callers = []
    for folder in ("hybridzoo", "configs", "data", "evaluation", "recipes", "modeling"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("add_argument", "add_mutually_exclusive_group"):
                    callers.append(str(path.relative_to(ROOT)))
    assert sorted(set(callers)) == ["configs/settings.py"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"step": 3}, "my.yaml: `step` is not a sweep field; did you mean `steps`?"),
        ({"steps": "ten"}, "my.yaml: steps: expected int, got 'ten' (str)."),
        ({"models": [{"name": "a", "zoo": "lstm", "overides": {}}]},
         "unknown key `overides`; did you mean `overrides`?"),
        ({"models": [{"name": "a", "zoo": "lstm", "d_models": 16}]},
         "my.yaml: models: a: d_models: expected list[int]"),
    ],
)
def test_a_sweep_file_is_checked_like_the_settings(change, expected):
    from hybridzoo.recipes.sweep import sweep_from_dict

    sweep = {"name": "x", "task": "mqar", "train": [{"seq_len": 16, "num_kv_pairs": 2}],
             "test": [{"seq_len": 16, "num_kv_pairs": 2}], "models": ["transformer"], "d_models": [16],
             "learning_rates": [1e-3], "steps": 3}
    with pytest.raises(ValueError) as error:
        sweep_from_dict({**sweep, **change}, "my.yaml")
    assert expected in str(error.value)


def test_the_local_hub_server_options_come_from_its_settings(capsys):
    from hybridzoo.testing.local_hub import main

    with pytest.raises(SystemExit) as exit:
        main(["--rot", "hub"])
    assert exit.value.code == 2 and "did you mean --root?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--port PORT port (0: any free port) (default: 0)" in " ".join(capsys.readouterr().out.split())
