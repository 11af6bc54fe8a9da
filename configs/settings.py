"""Settings declared once: a command's settings are a dataclass, and everything else is read from its fields.

    @dataclass
    class PushSettings:
        model_dir: str = setting(help="a folder written by save_pretrained", positional=True)
        repo_id: str = setting(help="OWNER/NAME on the Hub")
        private: bool = setting(False, help="create the repo private")

From that one declaration:
- `build(PushSettings, values)` makes the settings from a mapping (a recipe's YAML, keyword arguments): every key is
  checked, an unknown one gets "did you mean" (difflib, plus aliases: names other tools use for a key), a value of the
  wrong type names the key and the expected type, `choices` and `check` reject impossible values;
- `add_command(parser, PushSettings, run)` declares the argparse options (flag, type, choices, default, help; a bool
  is a switch, a list takes several values, a tuple is written `64:8`) and makes `run(settings)` the handler;
- `@takes_settings(PushSettings)` lets the Python function behind a command be called with the settings or with
  their fields as arguments, checked the same way, so the Python API and the command line take the same settings.

A field's help is `setting(help=...)`, else the comment at the end of its line in the class, so plain dataclasses
such as the recipe sections document themselves with comments. `SettingsParser` adds "did you mean" to a mistyped
flag, choice or subcommand, which argparse (Python 3.11) does not. This module imports only the standard library:
`hybridzoo --help` imports it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

MISSING = dataclasses.MISSING
Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it and the fix, or None when it is fine


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or an impossible value; the message names it and the fix."""


def setting(default: Any = MISSING, help: str = "", *, choices: Iterable | None = None,
            check: Check | None = None, flag: str | None = None, positional: bool = False, metavar: str | None = None,
            aliases: Iterable[str] = ()) -> Any:
    """A dataclass field with its help and checks. No `default`: the setting is required. A mutable default (a list,
    a dict) is copied for each instance. `choices`: the allowed values (of each item, for a list). `check`: a function
    of the value returning what is wrong with it, or None. `flag`: the command-line flag when it is not `--name`.
    `positional`: a command-line argument without a flag. `aliases`: other names suggested for this one."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check,
                "flag": flag, "positional": positional, "metavar": metavar, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(minimum: float) -> Check:
    """A `check`: the value (each item, for a list) is at least `minimum`; None passes (it means "the default")."""
    def check(value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        return None if all(v is None or v >= minimum for v in values) else f"use at least {minimum}, got {value!r}."

    return check


# ---------------------------------------------------------------------------------------------------------------------
# types: what a value must be, read from the annotations


def _union_members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def type_name(annotation: Any) -> str:
    """`int`, `str or null`, `list[tuple[int, int]]`: the type as an error message names it."""
    members = _union_members(annotation)
    if len(members) > 1:
        return " or ".join(type_name(a) for a in members)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    return {type(None): "null", Any: "any"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def matches(value: Any, annotation: Any) -> bool:
    """Whether `value` is of type `annotation` (unions, lists and tuples of given types included; an int is a float,
    a bool is not an int)."""
    members = _union_members(annotation)
    if len(members) > 1:
        return any(matches(value, a) for a in members)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is tuple:
        if args[-1:] == (Ellipsis,):
            return isinstance(value, tuple) and all(matches(v, args[0]) for v in value)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(matches, value, args))
    return isinstance(value, origin or annotation)


def _coerce(value: Any, annotation: Any) -> Any:
    """The lossless conversions YAML, JSON and keyword arguments need: an int or a numeric string (YAML 1.1 reads
    `3e-4` as a string) for a float, a list for a tuple; anything else is returned as it is, to be type-checked."""
    members = _union_members(annotation)
    if len(members) > 1:
        for member in members:
            converted = _coerce(value, member)
            if matches(converted, member):
                return converted
        return value
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is list and args and isinstance(value, list):
        return [_coerce(v, args[0]) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# building settings from a mapping, every key checked


def did_you_mean(key: str, known: Iterable[str], aliases: dict[str, str] | None = None, prefix: str = "") -> str:
    """"did you mean `train.lr`?" for a mistyped or foreign key (an alias first, else the closest known key), or the
    list of known keys when nothing is close."""
    known = list(known)
    alias = (aliases or {}).get(key)
    close = [alias] if alias in known else difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean `{prefix}{close[0]}`?" if close else f"known keys: {', '.join(known)}."


def _aliases(cls: type, extra: dict[str, str] | None) -> dict[str, str]:
    found = dict(extra or {})
    for f in dataclasses.fields(cls):
        found.update({alias: f.name for alias in f.metadata.get("aliases", ())})
    return found


def _problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with a well-typed value: not among the field's `choices`, or rejected by its `check`."""
    choices = f.metadata.get("choices")
    if choices and value is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
                return (f"{item!r} is not one of {', '.join(map(str, choices))}"
                        + (f"; did you mean {close[0]!r}?" if close else "."))
    check = f.metadata.get("check")
    return check(value) if check is not None else None


def as_dict(settings: Any) -> dict[str, Any]:
    """A settings object's fields (one level: nested sections stay objects)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.init}


def build(cls: type, values: Any, *, prefix: str = "", aliases: dict[str, str] | None = None,
          error: type[SettingsError] = SettingsError, names: dict[str, str] | None = None) -> Any:
    """`values` (a mapping, or a `cls` to check again) as a `cls`, each key checked; a field whose type is a
    dataclass takes a nested mapping, checked the same way. Errors name the key as `prefix + key` (`train.lr`), or
    as `names[key]` (the command line passes its flags).
    """
    if isinstance(values, cls):
        values = as_dict(values)
    if not isinstance(values, dict):
        raise error(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping of keys, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = names or {}
    kwargs = {}
    for key, value in values.items():
        label = names.get(key, f"{prefix}{key}")
        if key not in known:
            raise error(f"{label}: unknown key; {did_you_mean(key, known, _aliases(cls, aliases), prefix)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = build(annotation, value or {}, prefix=f"{label}.", aliases=aliases, error=error)
            continue
        value = _coerce(value, annotation)
        if not matches(value, annotation):
            raise error(f"{label}: expected {type_name(annotation)}, got {value!r} ({type(value).__name__}).")
        problem = _problem(known[key], value)
        if problem:
            raise error(f"{label}: {problem}")
        kwargs[key] = value
    missing = [name for name, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and name not in kwargs]
    if missing:
        label = names.get(missing[0], f"{prefix}{missing[0]}")
        raise error(f"{label}: required key is missing; add `{label}: ...`.")
    return cls(**kwargs)


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh copy of a mutable one), or MISSING for a required field."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def takes_settings(cls: type) -> Callable:
    """Make `function(settings: cls, **extra)` callable as `function(cls(...))` or with the settings' fields as
    arguments (`function(model_dir, repo_id, private=True)`, positional ones in field order): they are built into a
    `cls` by `build` (type checks, "did you mean"). The function's own further keyword arguments pass through."""
    def decorate(function: Callable) -> Callable:
        own = list(inspect.signature(function).parameters.values())[1:]
        names = [f.name for f in dataclasses.fields(cls) if f.init]

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            passed = {p.name: kwargs.pop(p.name) for p in own if p.name in kwargs}
            if args and isinstance(args[0], cls):
                if len(args) > 1 or kwargs:
                    raise TypeError(f"{function.__name__}(): pass either a {cls.__name__} or its fields, not both")
                values = as_dict(args[0])
            else:
                if len(args) > len(names):
                    raise TypeError(f"{function.__name__}() takes at most {len(names)} positional arguments "
                                    f"({', '.join(names)}), got {len(args)}")
                values = dict(zip(names, args, strict=False))  # the first len(args) fields
                twice = sorted(set(values) & set(kwargs))
                if twice:
                    raise TypeError(f"{function.__name__}() got several values for {twice[0]!r}")
                values.update(kwargs)
            return function(build(cls, values), **passed)

        parameters = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=f.type,
                                        default=inspect.Parameter.empty if default_of(f) is MISSING else default_of(f))
                      for f in dataclasses.fields(cls) if f.init]
        parameters += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        returns = inspect.signature(function).return_annotation
        call.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        return call

    return decorate


# ---------------------------------------------------------------------------------------------------------------------
# help text: `setting(help=...)`, else the comment at the end of the field's line


@functools.cache
def _line_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment ending its line in `cls`'s source ({} when the source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
            lines.setdefault(token.start[0], []).append(token)
    found = {}
    for tokens in lines.values():
        if (len(tokens) >= 3 and tokens[0].type == tokenize.NAME and tokens[1].string == ":"
                and tokens[-1].type == tokenize.COMMENT):
            found.setdefault(tokens[0].string, tokens[-1].string.lstrip("#").strip())
    return found


def help_of(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("help") or _line_comments(cls).get(f.name, "")


def format_value(value: Any) -> str:
    """A value as it is typed on the command line: `64:8` for a tuple, space-separated items for a list."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ":".join(map(format_value, value))
    if isinstance(value, list):
        return " ".join(map(format_value, value)) if value else "none"
    return str(value) if value == str(value).strip() and value != "" else repr(value)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key, nested sections dotted: `train.lr (float, default 0.001): help` (YAML-style values)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = default_of(f)
        shown = "required" if default is MISSING else f"default {json.dumps(default)}"
        text = help_of(cls, f)
        lines.append(f"{prefix}{f.name} ({type_name(hints[f.name])}, {shown})" + (f": {text}" if text else ""))
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# the command line: options generated from the fields


def flag_of(f: dataclasses.Field) -> str:
    """`--batch-size` for `batch_size` (or the field's own `flag`); `--no-x` for a switch that is on by default; a
    positional field's name."""
    if f.metadata.get("positional"):
        return f.name
    if f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parse_tuple(element_types: tuple) -> Callable[[str], tuple]:
    """`64:8` -> (64, 8) for a tuple of `element_types`."""
    def parse(text: str) -> tuple:
        parts = text.split(":")
        try:
            if len(parts) != len(element_types):
                raise ValueError
            return tuple(kind(part) for kind, part in zip(element_types, parts, strict=True))
        except ValueError:
            example = ":".join(["64", "8", "1", "1"][:len(element_types)])
            names = ", ".join(t.__name__ for t in element_types)
            raise argparse.ArgumentTypeError(f"write {len(element_types)} values ({names}) joined by ':', e.g. "
                                             f"{example}; got {text!r}") from None

    return parse


def _command_line_form(annotation: Any) -> tuple[Any, bool]:
    """(the type of one command-line word, whether the option takes a list of them)."""
    members = [m for m in _union_members(annotation) if m is not type(None)]
    kind = members[0]  # `str | Path` is typed as a str
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    is_list = kind is list or origin is list
    if is_list:
        kind = args[0] if args else str
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return _parse_tuple(args), is_list
    if kind in (int, float, str, bool) or (isinstance(kind, type) and not dataclasses.is_dataclass(kind)
                                            and kind not in (dict, list, tuple)):
        return kind, is_list
    raise TypeError(f"{annotation} has no command-line form; give it one in configs/settings.py")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option (or positional argument) per field of `cls`, with its type, choices, default and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, is_list = _command_line_form(hints[f.name])
        default, choices = default_of(f), f.metadata.get("choices")
        options: dict[str, Any] = {}
        if kind is bool and not is_list:
            options["action"] = "store_false" if default is True else "store_true"
        else:
            options["type"] = kind
            if choices:
                options["choices"] = choices
            if f.metadata.get("metavar"):
                options["metavar"] = f.metadata["metavar"]
            elif not f.metadata.get("positional") and (not choices or len(",".join(map(str, choices))) > 40):
                options["metavar"] = flag_of(f).lstrip("-").replace("-", "_").upper()  # `--examples N`: its flag
        text = help_of(cls, f)
        if choices and "metavar" in options:  # a long list of choices goes in the help, not in every usage line
            text += f"; one of {', '.join(map(str, choices))}"
        if default is not MISSING and "(default" not in text:
            text = f"{text} (default: {format_value(default)})".strip()
        options["help"] = text.replace("%", "%%")  # argparse formats help with %
        if "action" in options:
            parser.add_argument(flag_of(f), dest=f.name, **options)
            continue
        if f.metadata.get("positional"):
            if is_list:
                options["nargs"] = "+" if default is MISSING else "*"
            elif default is not MISSING:
                options["nargs"] = "?"
            if default is not MISSING:
                options["default"] = default
            parser.add_argument(f.name, **options)
            continue
        if is_list:
            options["nargs"] = "+"
        if default is MISSING:
            options["required"] = True
        else:
            options["default"] = default
        parser.add_argument(flag_of(f), dest=f.name, **options)


def add_command(parser: argparse.ArgumentParser, cls: type, run: Callable[[Any], Any]) -> None:
    """Declare `cls`'s fields as `parser`'s options; running the command builds a `cls` from them (checks with
    errors naming the flag) and calls `run(settings)`, whose result is the exit status when it is an int. A
    `SettingsError` from `run` is reported like a bad flag. The parser's `settings_class` default names `cls`."""
    add_options(parser, cls)
    flags = {f.name: flag_of(f) for f in dataclasses.fields(cls)}

    def handler(args: argparse.Namespace) -> Any:
        try:
            return run(build(cls, {name: getattr(args, name) for name in flags}, names=flags))
        except SettingsError as error:
            parser.error(str(error))

    parser.set_defaults(handler=handler, settings_class=cls)


class SettingsParser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped flag or choice (Python 3.11's argparse only says "unrecognized
    arguments" or lists the choices). Subcommand parsers made by `add_subparsers` are of the same class, so each
    checks its own flags."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:  # argparse's hook for `choices`
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            if close:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r}; did you mean {close[0]!r}?")
        super()._check_value(action, value)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for `error`, which argparse calls mid-parse
        namespace, extras = super().parse_known_args(args, namespace)
        for extra in extras:
            if self._is_unknown_flag(extra):
                self.error(f"unrecognized argument {extra}; {self._suggestion(extra)}")
        return namespace, extras

    def error(self, message: str):  # noqa: ANN201 - never returns
        """argparse's error (usage, message, exit 2); when a required argument is "missing" because its flag was
        mistyped, the mistyped flag is named with its suggestion."""
        unknown = [arg for arg in getattr(self, "_given", []) if self._is_unknown_flag(arg)]
        if unknown and message.startswith("the following arguments are required"):
            message += f" (unrecognized argument {unknown[0]}: {self._suggestion(unknown[0])})"
        super().error(message)

    def _is_unknown_flag(self, arg: str) -> bool:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-") or len(flag) < 2 or _is_number(flag) or flag == "--":
            return False
        return not any(option.startswith(flag) for option in self._option_string_actions)  # argparse takes prefixes

    def _suggestion(self, arg: str) -> str:
        known = [option for option in self._option_string_actions if option.startswith("--")]
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
        return f"did you mean {close[0]}?" if close else f"the options are {', '.join(known)}."


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
