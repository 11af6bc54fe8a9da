"""The block registry: `block_types` names -> block classes. The config, the zoo, the LoRA defaults and the cache all
loop over it, so no other file names a block.

How to add a block (say "toy", letter "T"):
1. an ops file with the pure tensor functions (`ops_toy.py`: no nn.Module, no config), tested against a naive loop;
2. a block file (`block_toy.py`): a `HybridBlock` subclass that declares its facts (see `block_base.py`), e.g.

       class HybridToy(HybridBlock):
           block_type, pattern_letter = "toy", "T"
           config_fields = (BlockField("toy_decay", 0.9, "decay in (0, 1)", lambda v: 0 < v < 1, "must be in (0, 1)"),)
           lora_targets = ("in_proj", "out_proj")
           state_formula = "4·D (fp32 h)"

           @classmethod
           def state_bytes(cls, config, dtype_bytes): return 4 * config.hidden_size

           def forward(self, hidden_states, state=None, mask=None, reset=None): ...  # -> (y, state)

3. one registration line: inside hybridzoo, add the class to `BUILTIN_BLOCKS` below; outside, call
   `register_block(HybridToy)` after importing hybridzoo.

Then `HybridConfig(block_pattern="TTA", toy_decay=0.5)` validates and saves the new field, `hybridzoo zoo` lists the
block with its formulas, LoRA (hybridzoo's helpers and a plain `peft.LoraConfig`) adapts its `lora_targets`, and
generation keeps its state in the cache. A block registered from outside the package travels with the models that
use it: `save_pretrained` copies its file (and the files it imports relatively) next to the weights, with
`hybridzoo.modeling.<module>` imports made relative, and lists it in the saved `blocks_external.py`, so
`from_pretrained(folder, trust_remote_code=True)` loads it where hybridzoo is not installed.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .block_attention import HybridAttention, HybridSlidingWindowAttention
from .block_base import BlockField, HybridBlock
from .block_gated_deltanet import HybridGatedDeltaNet
from .block_lstm import HybridLSTM
from .block_mamba2 import HybridMamba2
from .block_mlstm import HybridMLSTM
from .block_pararnn import HybridParaGRU, HybridParaLSTM
from .block_rglru import HybridRGLRU
from .block_slstm import HybridSLSTM
from .blocks_external import EXTERNAL_BLOCKS
from .layers import HybridMLP

BUILTIN_BLOCKS = [
    HybridAttention,
    HybridSlidingWindowAttention,
    HybridGatedDeltaNet,
    HybridLSTM,
    HybridMamba2,
    HybridMLSTM,
    HybridParaGRU,
    HybridParaLSTM,
    HybridRGLRU,
    HybridSLSTM,
]
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")

BLOCK_CLASSES: dict[str, type[HybridBlock]] = {}  # block_type -> class, in registration order
BLOCK_LETTERS: dict[str, str] = {}  # pattern letter -> block_type
# called with the block class after every (un)registration; `import hybridzoo` adds the PEFT defaults' refresh here
REGISTRY_LISTENERS: list[Callable[[type[HybridBlock]], None]] = []

# `HybridConfig`'s own dataclass fields; a block field must not reuse one of these names (filled by the config module)
RESERVED_FIELD_NAMES: set[str] = set()


def block_fields() -> dict[str, BlockField]:
    """Every registered block's config fields, by name, in registration order."""
    fields = {}
    for block in BLOCK_CLASSES.values():
        for field in block.config_fields:
            fields.setdefault(field.name, field)
    return fields


def register_block(block: type[HybridBlock]) -> type[HybridBlock]:
    """Add `block` to the registry (usable as a class decorator). Checks that its declarations are complete and that
    its name, letter and config field names are new."""
    name = getattr(block, "block_type", None)
    if not (isinstance(block, type) and issubclass(block, HybridBlock)):
        raise TypeError(f"register_block: {block!r} must be a subclass of hybridzoo's `HybridBlock`.")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{block.__name__}.block_type must be a lower_snake_case name, got {name!r}.")
    letter = getattr(block, "pattern_letter", None)
    if not isinstance(letter, str) or not re.fullmatch(r"[A-Z]", letter):
        raise ValueError(f"{block.__name__}.pattern_letter must be one capital letter, got {letter!r}.")
    if block.layer_type not in LAYER_TYPES:
        raise ValueError(f"{block.__name__}.layer_type must be one of {LAYER_TYPES}, got {block.layer_type!r}.")
    if BLOCK_CLASSES.get(name, block) is not block:
        raise ValueError(f"Block type {name!r} is already registered by {BLOCK_CLASSES[name].__name__}.")
    if BLOCK_LETTERS.get(letter, name) != name:
        raise ValueError(f"Pattern letter {letter!r} is already used by block type {BLOCK_LETTERS[letter]!r}.")
    if block.is_recurrent and getattr(block.state_bytes, "__func__", None) is HybridBlock.state_bytes.__func__:
        raise ValueError(f"{block.__name__} is recurrent and must define `state_bytes(config, dtype_bytes)`.")
    known = block_fields()
    for field in block.config_fields:
        if field.name in RESERVED_FIELD_NAMES or known.get(field.name, field) is not field:
            raise ValueError(f"{block.__name__}: config field `{field.name}` is already a HybridConfig field.")
    BLOCK_CLASSES[name] = block
    BLOCK_LETTERS[letter] = name
    for listener in REGISTRY_LISTENERS:
        listener(block)
    return block


def unregister_block(block_type: str) -> None:
    """Remove a registered block (for tests and plugins that register temporarily)."""
    block = BLOCK_CLASSES.pop(block_type)
    del BLOCK_LETTERS[block.pattern_letter]
    for listener in REGISTRY_LISTENERS:
        listener(block)


def is_external(block: type[HybridBlock]) -> bool:
    """Whether `block` was defined outside this folder (and so must be shipped next to a saved model's weights)."""
    return block.__module__.rpartition(".")[0] != __name__.rpartition(".")[0]


def ship_external_blocks(folder: str | os.PathLike, block_types: list[str]) -> list[str]:
    """Copy the code of the external blocks among `block_types` into a saved model's `folder` (see module docstring).

    Returns the file names written. Every file is written whole or not at all.
    """
    folder = Path(folder)
    external = [BLOCK_CLASSES[name] for name in dict.fromkeys(block_types) if is_external(BLOCK_CLASSES[name])]
    if not external:
        return []  # the `blocks_external.py` that transformers copied is already right
    own_files = {path.name for path in Path(__file__).parent.glob("*.py")}
    written, imports = [], []
    for block in external:
        source = Path(inspect.getsourcefile(block))
        if source.name in own_files:
            raise ValueError(
                f"The file of block {block.block_type!r} is named {source.name}, like one of hybridzoo's modeling "
                "files; rename it so it can be saved next to them."
            )
        for path in [source, *map(Path, get_relative_import_files(source))]:
            _write_atomic(folder / path.name, _make_imports_relative(path.read_text(encoding="utf-8"), path))
            written.append(path.name)
        imports.append((source.stem, block.__name__))
    lines = ['"""Blocks from outside hybridzoo that this saved model uses (written by `save_pretrained`)."""', ""]
    lines += [f"from .{module} import {name}" for module, name in imports]
    lines += ["", f"EXTERNAL_BLOCKS = [{', '.join(name for _, name in imports)}]", ""]
    _write_atomic(folder / "blocks_external.py", "\n".join(lines))
    return [*written, "blocks_external.py"]


def _make_imports_relative(text: str, path: Path) -> str:
    """`from hybridzoo.modeling.x import y` -> `from .x import y`; any other hybridzoo import cannot be shipped."""
    text = re.sub(r"^(\s*)from\s+hybridzoo\.modeling\.(\w+)\s+import", r"\1from .\2 import", text, flags=re.MULTILINE)
    leftover = re.search(r"^\s*(from|import)\s+hybridzoo\b.*$", text, flags=re.MULTILINE)
    if leftover:
        raise ValueError(
            f"{path}: `{leftover.group(0).strip()}` cannot be shipped as remote code; a block file may import "
            "torch, transformers, its own files relatively and `from hybridzoo.modeling.<module> import ...`."
        )
    return text


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def lora_target_suffixes() -> list[str]:
    """Module-name suffixes LoRA adapts by default in any hybridzoo model: every registered block's `lora_targets`
    (under `mixer.`) plus the MLP's. PEFT's default target mapping for `model_type="hybridzoo"` is this list."""
    suffixes = [f"mixer.{name}" for block in BLOCK_CLASSES.values() for name in block.lora_targets]
    return list(dict.fromkeys([*suffixes, *(f"mlp.{name}" for name in HybridMLP.lora_targets)]))


for _block in [*BUILTIN_BLOCKS, *EXTERNAL_BLOCKS]:
    register_block(_block)

__all__ = [
    "BLOCK_CLASSES",
    "BLOCK_LETTERS",
    "BlockField",
    "HybridBlock",
    "block_fields",
    "lora_target_suffixes",
    "register_block",
    "ship_external_blocks",
    "unregister_block",
]
