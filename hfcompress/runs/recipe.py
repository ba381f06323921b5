"""YAML recipes -> typed stage configs.

A recipe is a YAML mapping::

    # Run: hfcompress run recipes/quantize-int8-rtn.yaml
    name: quantize-int8-rtn
    model: reference:small          # the input of the first stage
    output_dir: runs/quantize-int8-rtn
    stages:
      - quantize:                   # the stage kind ...
          method: rtn               # ... and its keys: exactly the fields of the kind's config dataclasses
          bits: 8
      - evaluate:
          models: [model, quantize]

Each stage is a one-key mapping ``{kind: {key: value}}``. Every kind accepts ``name`` (default: the kind, made
unique) and ``input`` (a path, ``model``, or an earlier stage's name; default: the last stage that produced a
model). All other keys must be fields of the kind's dataclasses (see :mod:`hfcompress.jobs.stages`); an unknown key
is an error with a "did you mean" suggestion, a wrong type is an error naming the stage and key.
Loading is ``yaml.safe_load`` only; no value is ever evaluated.

A recipe file cannot write outside its run folder: its ``output_dir`` must be a relative path below the
current folder (no absolute path, no ``..``, no symbolic link that leads elsewhere), and a stage cannot set
``output_dir`` (each stage writes into its own folder of the run). The person running it chooses any folder
with ``--output`` or ``--set output_dir=...``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.errors import ConfigError
from ..jobs.arguments import (
    build_dataclasses,
    check_recipe_outputs,
    read_config_file,
    suggest,
    yaml_problem,
)

TOP_LEVEL_KEYS = ("name", "description", "model", "output_dir", "stages")


@dataclass
class Stage:
    kind: str
    name: str
    input: str | None
    configs: dict  # dataclass name -> dataclass instance
    raw: dict      # the stage's keys as written (after overrides), for hashing and model cards

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({"kind": self.kind, "input": self.input, "raw": self.raw},
                                         sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Recipe:
    name: str
    model: str | None
    output_dir: str
    stages: list[Stage]
    description: str = ""
    source: str = ""          # the YAML text (with overrides applied) as run
    path: str | None = None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.model] + [s.digest() for s in self.stages]).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Overrides: --set stage.key=value / --set key=value
# --------------------------------------------------------------------------------------------------------
def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value or stage.key=value")
    key, _, raw_value = text.partition("=")
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from exc
    return key.strip().split("."), value


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    document = copy.deepcopy(document)
    for text in overrides or []:
        path, value = _parse_override(text)
        if len(path) == 1:
            if path[0] not in TOP_LEVEL_KEYS or path[0] == "stages":
                raise ConfigError(f"override {text!r}: unknown top-level key {path[0]!r}"
                                  f"{suggest(path[0], [k for k in TOP_LEVEL_KEYS if k != 'stages'])}")
            document[path[0]] = value
            continue
        if len(path) != 2:
            raise ConfigError(f"override {text!r}: use stage.key=value (stage = its name, kind or index)")
        target, key = path
        stages = document.get("stages") or []
        matches = [s for i, s in enumerate(stages)
                   if isinstance(s, dict) and len(s) == 1 and (
                       str(i) == target or next(iter(s)) == target
                       or (next(iter(s.values())) or {}).get("name") == target)]
        if len(matches) != 1:
            names = [(next(iter(s.values())) or {}).get("name") or next(iter(s)) for s in stages if isinstance(s, dict)]
            raise ConfigError(f"override {text!r}: {'no' if not matches else 'more than one'} stage matches "
                              f"{target!r}{suggest(target, names) if not matches else ''}")
        body = next(iter(matches[0].values()))
        if body is None:
            matches[0][next(iter(matches[0]))] = body = {}
        body[key] = value
    return document


# --------------------------------------------------------------------------------------------------------
# Output paths: a recipe writes only inside its run folder
# --------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
def parse_recipe(document, overrides: list[str] | None = None, source: str = "", path: str | None = None) -> Recipe:
    from ..jobs.stages import STAGE_KINDS

    where = path or "recipe"
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping with a 'stages' list")
    check_recipe_outputs(document, where)
    document = apply_overrides(document, overrides or [])
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{where}: unknown top-level key {key!r}{suggest(key, TOP_LEVEL_KEYS)}")
    raw_stages = document.get("stages")
    if raw_stages is not None and not isinstance(raw_stages, list):
        raise ConfigError(f"{where}: 'stages' must be a list of stages like '- quantize: {{bits: 4}}', "
                          f"got {raw_stages!r}")
    if not raw_stages:
        raise ConfigError(f"{where}: missing required key 'stages' (a non-empty list of stages)")
    name = str(document.get("name") or (Path(path).stem if path else "recipe"))

    stages: list[Stage] = []
    seen_names: set[str] = set()
    for index, entry in enumerate(raw_stages):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: stage {index} must be a one-key mapping like '- quantize: {{...}}'")
        kind, body = next(iter(entry.items()))
        if kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: stage {index} has unknown kind {kind!r}{suggest(kind, STAGE_KINDS)}")
        if not isinstance(body or {}, dict):
            raise ConfigError(f"{where}: stage {index} ({kind}) must map keys to values, like "
                              f"'- {kind}: {{key: value}}'; got {body!r}")
        body = dict(body or {})
        stage_name = str(body.pop("name", None) or kind)
        if stage_name in seen_names:
            if "name" in (entry[kind] or {}):
                raise ConfigError(f"{where}: two stages are named {stage_name!r}; stage names must be unique")
            stage_name = f"{stage_name}_{index}"
        seen_names.add(stage_name)
        stage_input = body.pop("input", None)
        raw = dict(body)
        spec = STAGE_KINDS[kind]
        stage_where = f"{where}: stage {index} ({stage_name})"
        missing = [k for k in spec.required if k not in body]
        if missing:
            raise ConfigError(f"{stage_where}: missing required key {missing[0]!r}")
        # The same mapping a --config file is, through the same parser (jobs/arguments.py).
        configs = build_dataclasses(spec.config_classes, body, stage_where, spec.defaults)
        stages.append(Stage(kind=kind, name=stage_name, input=stage_input, configs=configs, raw=raw))

    recipe = Recipe(name=name, model=document.get("model"), description=str(document.get("description") or ""),
                    output_dir=str(document.get("output_dir") or f"runs/{name}"), stages=stages,
                    source=source if source and not overrides else yaml.safe_dump(document, sort_keys=False),
                    path=path)
    _check_inputs(recipe, where)
    return recipe


def _check_inputs(recipe: Recipe, where: str) -> None:
    """Each stage's inputs must be the recipe's model, an earlier stage, a local path or a Hub id."""
    from ..jobs.stages import STAGE_KINDS

    produced = ["model"] if recipe.model else []
    model = str(recipe.model) if recipe.model else ""
    if model and model.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"{where}: model {model!r} does not exist; set 'model' to a model folder, a Hub id or "
                          f"reference:<size>")
    _check_reference_names([model] + [str(ref) for stage in recipe.stages
                                      for ref in [stage.input] + STAGE_KINDS[stage.kind].referenced_models(stage)],
                           where)
    for index, stage in enumerate(recipe.stages):
        spec = STAGE_KINDS[stage.kind]
        references = ([stage.input] if stage.input else []) + spec.referenced_models(stage)
        for ref in map(str, references):
            if ref in produced or ref.startswith("reference:") or os.path.exists(os.path.expanduser(ref)):
                continue
            later = {s.name for s in recipe.stages[index:]}
            if ref == "model" or ref in later:
                raise ConfigError(f"{where}: stage {index} ({stage.name}) needs {ref!r}, which no earlier stage "
                                  f"produces (set the recipe's 'model' or reorder the stages)")
            if "/" not in ref or ref.startswith((".", "/", "~")):
                raise ConfigError(f"{where}: stage {index} ({stage.name}) refers to {ref!r}, which is neither an "
                                  f"earlier stage nor an existing path{suggest(ref, produced)}")
        if spec.needs_input and not stage.input and not produced:
            raise ConfigError(f"{where}: stage {index} ({stage.name}) needs an input model: set the recipe's "
                              f"'model' key or the stage's 'input'")
        if spec.produces_model:
            produced.append(stage.name)


def _check_reference_names(refs: list[str], where: str) -> None:
    """``reference:<size>`` must name a reference teacher (else the run would fail after creating its folder)."""
    from ..models.reference import REFERENCE_SPECS

    for ref in refs:
        if ref.startswith("reference:") and ref.partition(":")[2] not in REFERENCE_SPECS:
            raise ConfigError(f"{where}: unknown reference model {ref!r}; use one of "
                              f"{', '.join('reference:' + size for size in REFERENCE_SPECS)}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    text = path.read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {yaml_problem(exc)}") from exc
    return parse_recipe(document, overrides=overrides, source=text, path=str(path))


def dataclass_to_yaml_dict(instance) -> dict:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.init}


# ``scripts/*.py --config FILE`` reads the same mapping as a recipe stage (kept under its old name).
flat_stage_arguments = read_config_file
