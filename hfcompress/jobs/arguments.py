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

import difflib
import os
from pathlib import Path

import yaml

from ..core.errors import ConfigError

COMMON_STAGE_KEYS = ("name", "input")


def suggest(key: str, valid) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``valid``, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


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
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping of argument names to values (or a recipe)")
    if "stages" not in document:
        return document
    for stage in document.get("stages") or []:
        if isinstance(stage, dict) and kind in stage:
            values = {k: v for k, v in (stage[kind] or {}).items() if k not in COMMON_STAGE_KEYS}
            input_key = {"distill": "teacher", "quantize": "model"}.get(kind)
            if input_key and document.get("model") and input_key not in values:
                values[input_key] = document["model"]
            return values
    raise ConfigError(f"recipe {path} has no {kind!r} stage")
