"""Runs a recipe's stages in order, resumably.

Layout of a run folder::

    runs/quickstart/
      run.json                 # recipe name + digest: identifies the run (refuses a different recipe)
      recipe.yaml              # the recipe as run (overrides applied)
      00-distill/              # one folder per stage, renamed into place only when the stage succeeded
        stage.json             # the finished-marker: stage digest, summary, seconds
        config.json, model.safetensors, tokenizer..., README.md (model card)
      01-quantize/ ...
      02-evaluate/results.json
      report.md, report.json, report.png

A stage runs in a hidden staging folder beside its final one (:func:`hfcompress.core.atomic.atomic_folder`),
whose files are hashed into ``hfcompress-manifest.json`` and which is renamed into place only after the stage
succeeded and wrote its marker, so an interrupted or failed stage never leaves a half-written output, never
touches earlier stages, and simply restarts on the next run. A finished stage whose digest matches is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..core.atomic import atomic_folder, atomic_write_text
from ..core.errors import ConfigError
from .recipe import Recipe
from ..jobs.stages import STAGE_KINDS, StageContext

logger = logging.getLogger(__name__)

RUN_MARKER = "run.json"
STAGE_MARKER = ".stage.json"  # hidden, so a push of a stage folder does not upload it


def stage_dir_name(index: int, name: str) -> str:
    return f"{index:02d}-{name}"


def _prepare_run_dir(recipe: Recipe, run_dir: Path, overwrite: bool) -> None:
    marker = run_dir / RUN_MARKER
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.is_file():
            if not overwrite:
                raise ConfigError(f"output folder {str(run_dir)!r} exists and is not an hfcompress run; choose "
                                  f"another --output or pass --overwrite to replace it")
            shutil.rmtree(run_dir)
        else:
            previous = json.loads(marker.read_text())
            if previous.get("recipe_digest") != recipe.digest() or previous.get("recipe") != recipe.name:
                if not overwrite:
                    raise ConfigError(
                        f"output folder {str(run_dir)!r} holds a run of a different recipe or different "
                        f"settings ({previous.get('recipe')!r}); choose another --output or pass --overwrite")
                shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"recipe": recipe.name, "recipe_digest": recipe.digest(),
                                          "recipe_path": recipe.path}, indent=2) + "\n")
    atomic_write_text(run_dir / "recipe.yaml", recipe.source)


def run_recipe(recipe: Recipe, output: str | os.PathLike | None = None, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Execute ``recipe``; returns the run folder. Finished stages are skipped on a rerun."""
    from ..models.loading import resolve_model
    from .report import write_report

    run_dir = Path(output or recipe.output_dir).expanduser()
    _prepare_run_dir(recipe, run_dir, overwrite)
    outputs: dict[str, Path] = {}
    produced: list[str] = []
    summaries = []

    def resolve(ref: str) -> str:
        if ref == "model":
            if recipe.model is None:
                raise ConfigError("the recipe has no 'model' key to refer to")
            return resolve_model(recipe.model)
        if ref in outputs:
            return str(outputs[ref])
        return resolve_model(ref)

    bar = tqdm(recipe.stages, desc=f"recipe {recipe.name}", disable=not progress, unit="stage")
    for index, stage in enumerate(bar):
        bar.set_postfix(stage=stage.name)
        final = run_dir / stage_dir_name(index, stage.name)
        marker = final / STAGE_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("digest") == stage.digest():
            logger.info("stage %s already finished; skipping", stage.name)
            summary = json.loads(marker.read_text())
        else:
            default_input = produced[-1] if produced else ("model" if recipe.model else None)
            with atomic_folder(final, overwrite=True) as scratch:
                context = StageContext(recipe=recipe, stage=stage, index=index, work_dir=scratch, run_dir=run_dir,
                                       resolve=resolve, default_input=default_input, produced=list(produced),
                                       progress=progress)
                started = time.perf_counter()
                result = STAGE_KINDS[stage.kind].run(context) or {}
                if "output" in result:  # the stage saw its staging folder; readers see the final one
                    result["output"] = final.name
                summary = {"stage": stage.name, "kind": stage.kind, "digest": stage.digest(), "index": index,
                           "seconds": round(time.perf_counter() - started, 2), "settings": stage.raw, **result}
                (scratch / STAGE_MARKER).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        outputs[stage.name] = final
        if STAGE_KINDS[stage.kind].produces_model:
            produced.append(stage.name)
        summaries.append(summary)

    write_report(run_dir, recipe, summaries)
    return run_dir
