"""One parser for every entry point: ``transformers.HfArgumentParser`` over the jobs' dataclasses.

The ``hfcompress`` subcommands, ``scripts/quantize.py``, ``scripts/distill.py`` and recipe stages all read
their options here:

* flags go through :class:`ArgumentParser` (``HfArgumentParser`` that also takes ``none`` for optional
  numbers, reports a mistake as one line with a "did you mean", and reads ``--config FILE``);
* a ``--config`` file and a recipe stage are the same mapping of field names to values
  (:func:`read_config_file` takes a flat mapping, or a recipe's first stage of the job's kind), checked by
  :func:`route_keys` (unknown key -> "did you mean") and built by :func:`build_dataclasses`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..core.errors import ConfigError

COMMON_STAGE_KEYS = ("name", "input")


class UsageError(ConfigError):
    """A flag the parser does not know, or a value it cannot read; ``prog`` is the command it belongs to."""

    def __init__(self, message: str, prog: str = "hfcompress"):
        super().__init__(message)
        self.prog = prog


def suggest(key: str, valid) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``valid``, else the list of valid keys."""
    valid = [str(v) for v in valid]  # YAML keys may be numbers
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def yaml_problem(exc) -> str:
    """What PyYAML found wrong, on one line (a scanner error's ``problem``, a reader error's ``reason``)."""
    text = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def check_output_path(value, where: str, key: str, base: str | os.PathLike | None = None) -> None:
    """``value`` must be a relative path that stays below ``base`` (default: the current folder), also after
    following symbolic links; else a ConfigError naming ``key``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: key {key!r} must be a non-empty relative path, got {value!r}")
    path = Path(value).expanduser() if value.startswith("~") else Path(value)
    if path.is_absolute() or value.startswith("~"):
        raise ConfigError(f"{where}: key {key!r} is an absolute path ({value!r}); a recipe may only write below "
                          f"the folder it is run from: use a relative path, or choose the folder when running it "
                          f"(hfcompress run RECIPE --output DIR)")
    if ".." in path.parts:
        raise ConfigError(f"{where}: key {key!r} ({value!r}) climbs out of its folder with '..'; use a path "
                          f"below it, or choose the folder when running it (--output DIR)")
    root = Path(base or os.getcwd()).resolve()
    if not (root / path).resolve().is_relative_to(root):
        raise ConfigError(f"{where}: key {key!r} ({value!r}) leads outside {str(root)!r} through a symbolic link; "
                          f"use a real folder, or choose the folder when running it (--output DIR)")


def check_recipe_outputs(document: dict, where: str) -> None:
    """The recipe as written (before the runner's own ``--set`` overrides) keeps its outputs in its run folder."""
    if document.get("output_dir") is not None:
        check_output_path(document["output_dir"], where, "output_dir")
    stages = document.get("stages")
    for index, entry in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(entry, dict) and len(entry) == 1:
            kind, body = next(iter(entry.items()))
            if isinstance(body, dict) and "output_dir" in body:
                raise ConfigError(f"{where}: stage {index} ({kind}): key 'output_dir' cannot be set in a recipe: "
                                  f"each stage writes into its own folder of the run ({index:02d}-<name>); "
                                  f"remove the key")


def read_config_file(path: str | os.PathLike, kind: str) -> dict:
    """The keys of a YAML file for one job, for ``--config FILE``.

    ``FILE`` is either a flat mapping of argument names, or a recipe: then the first stage of ``kind`` is
    taken, with the recipe's ``model`` as its input (``model`` for quantize, ``teacher`` for distill) unless
    the stage sets it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping of argument names to values (or a recipe)")
    if "stages" not in document:
        return document
    check_recipe_outputs({"stages": document.get("stages")}, str(path))
    for stage in document.get("stages") or []:
        if isinstance(stage, dict) and kind in stage:
            values = {k: v for k, v in (stage[kind] or {}).items() if k not in COMMON_STAGE_KEYS}
            input_key = {"distill": "teacher", "quantize": "model"}.get(kind)
            if input_key and document.get("model") and input_key not in values:
                values[input_key] = document["model"]
            return values
    raise ConfigError(f"recipe {path} has no {kind!r} stage")


# --------------------------------------------------------------------------------------------------------
# A mapping (a recipe stage, a --config file) -> the dataclasses
# --------------------------------------------------------------------------------------------------------
def _type_ok(value, tp) -> bool:
    if tp is typing.Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation we do not check (e.g. a forward reference)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _wrap(where: str | None, build):
    """Run ``build()``; a failure of the dataclass's own checks becomes one ``ConfigError`` line at ``where``
    (``None``: our own errors pass through as they are)."""
    prefix = f"{where}: " if where else ""
    try:
        return build()
    except ConfigError as exc:
        if where is None:
            raise
        raise ConfigError(f"{prefix}{exc}") from exc
    except (TypeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{prefix}{message}") from exc


def build_dataclass(cls, values: dict, where: str):
    """Instantiate ``cls`` from ``values`` after checking each value's type; errors name ``where``."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        tp = hints.get(key, typing.Any)
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: key {key!r} expects {_type_name(tp)}, got {value!r}")
    # HfArgumentParser.parse_dict is how every entry point turns names into the dataclass.
    return _wrap(where, lambda: HfArgumentParser(cls).parse_dict(values)[0])


def route_keys(values: dict, classes: list, where: str, extra_keys=COMMON_STAGE_KEYS) -> dict:
    """Route each key to the first dataclass that has it; an unknown key raises with a suggestion."""
    routed: dict[str, dict] = {cls.__name__: {} for cls in classes}
    valid = {f.name: cls for cls in reversed(classes) for f in dataclasses.fields(cls) if f.init}
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, list(valid) + list(extra_keys))}")
        routed[valid[key].__name__][key] = value
    return routed


def build_dataclasses(classes: list, values: dict, where: str, defaults: dict | None = None) -> dict:
    """A mapping of field names -> ``{class name: instance}`` (``defaults``: class name -> field defaults)."""
    routed = route_keys(values, classes, where)
    return {cls.__name__: build_dataclass(cls, {**(defaults or {}).get(cls.__name__, {}), **routed[cls.__name__]},
                                          where)
            for cls in classes}


# --------------------------------------------------------------------------------------------------------
# Flags -> the dataclasses
# --------------------------------------------------------------------------------------------------------
def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid <name> value"
    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` as every hfcompress entry point uses it.

    On top of it: ``none`` is accepted for an optional number (``--group-size none``: per channel); a list
    flag may be given empty (``--ignore``: nothing ignored); with ``config_kind``, ``--config FILE`` reads
    :func:`read_config_file` and its keys become defaults that flags override; a mistake is one line naming
    the fix (``did you mean --bits?``): a :class:`UsageError` (the entry points exit with code 2).
    """

    def __init__(self, dataclass_types=None, *, config_kind: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(dataclass_types, **kwargs)
        self.config_kind = config_kind
        optional_numbers, lists = set(), set()
        for cls in self.dataclass_types:
            for name, tp in typing.get_type_hints(cls).items():
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
                    if args[0] in (int, float):
                        optional_numbers.add((name, args[0]))
                    tp = args[0]
                if typing.get_origin(tp) is list:
                    lists.add(name)
        for action in self._actions:
            for name, number in optional_numbers:
                if action.dest == name and action.type is number:
                    action.type = _none_or(number)
            if action.dest in lists and action.nargs == "+":
                action.nargs = "*"
        if config_kind:
            self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                              help=f"YAML file of these options (or a recipe: its first {config_kind} stage); "
                                   f"flags override it")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if self.config_kind and "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise ConfigError("--config needs a YAML file path")
            path = args[index + 1]
            args = args[:index] + args[index + 2:]
            values = read_config_file(path, self.config_kind)
            route_keys(values, self.dataclass_types, str(path), extra_keys=())
            self.set_defaults(**values)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """A usage mistake: one :class:`UsageError` line (with a "did you mean" for an unknown flag).

        Raised instead of argparse's usage-and-exit so that library callers get our error; the CLI and the
        scripts print it as ``prog: error: message`` and exit with code 2.
        """
        if message.startswith("unrecognized arguments:"):
            flags = [a for a in message.partition(":")[2].split() if a.startswith("--")]
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flags[0].partition("=")[0], known, n=1) if flags else []
            if close:
                message += f" (did you mean {close[0]}?)"
        raise UsageError(message, prog=self.prog)

    def parse_into_dataclasses(self, args: list[str] | None = None) -> tuple:
        """``parse_args_into_dataclasses``; a dataclass's own check failing is one ``ConfigError`` line."""
        *outputs, remaining = _wrap(None, lambda: self.parse_args_into_dataclasses(
            args=args, return_remaining_strings=True))
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)
