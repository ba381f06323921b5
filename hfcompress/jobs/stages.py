"""Stage kinds of a recipe: which config dataclasses a stage's keys map to, and how the stage runs.

A new kind slots in by adding one ``StageKind`` to ``STAGE_KINDS``; the recipe loader, the ``--set`` overrides,
the resumable runner and the report need no change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


# --------------------------------------------------------------------------------------------------------
# Stage argument dataclasses (the YAML keys besides the library's own config classes)
# --------------------------------------------------------------------------------------------------------
@dataclass
class QuantizeStageArgs:
    calibration_data: str = field(default="auto", metadata={
        "help": "text source for calibration: auto (stdlib for the reference teachers and their students, mix "
                "for every other model), stdlib|pydoc|mix[:split], a file/folder, a saved dataset or a datasets "
                "name"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest safetensors shard of the checkpoint"})
    device: str | None = field(default=None, metadata={
        "help": "where to load the model and calibrate: cpu, cuda, cuda:N or auto (default: cpu)"})
    strict: bool = field(default=False, metadata={
        "help": "fail, naming them, if any weight meant to be quantized would stay in floating point (e.g. an "
                "unsupported module type); nothing is written"})
    stream: bool = field(default=False, metadata={
        "help": "never load the whole model: quantize a safetensors checkpoint one decoder layer at a time from "
                "its shards (checkpoints larger than memory; resumable)"})
    max_memory: str | None = field(default=None, metadata={
        "help": "with --stream: the RSS budget, e.g. 8GB or 8GiB (default: the memory available); refused up "
                "front when one layer cannot be quantized within it"})


@dataclass
class EvaluateStageArgs:
    models: list[str] | None = field(default=None, metadata={
        "help": "models to evaluate: 'model' (the recipe's input), earlier stage names, paths or Hub ids; "
                "default: the input model and every model-producing stage"})
    data: str = field(default="stdlib:test", metadata={"help": "held-out text source"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per window (default min(context, 512))"})
    num_blocks: int | None = field(default=None, metadata={"help": "score a seeded subset of this many windows"})
    stride: int | None = field(default=None, metadata={"help": "overlapping windows advancing by this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    speed: bool = field(default=True, metadata={"help": "measure prefill/decode tokens/s at batch 1"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated for the decode speed"})
    runtime: str = field(default="auto", metadata={
        "help": "how to load compressed-tensors checkpoints: 'auto'/'packed' (hfcompress.load_compressed) "
                "or 'transformers' (plain from_pretrained, which decompresses)"})
    device: str | None = field(default=None, metadata={
        "help": "where to run the models: cpu, cuda, cuda:N or auto (default: cpu)"})
    device_map: str | None = field(default=None, metadata={
        "help": "accelerate device_map for plain checkpoints, e.g. 'auto' (instead of device)"})
    kl_to: str | None = field(default=None, metadata={
        "help": "also measure each model's mean KL from this model's next-token distributions ('model', a stage "
                "name, a path or Hub id), e.g. the teacher"})

    def __post_init__(self):
        from ..core.errors import ConfigError

        if self.runtime not in ("auto", "packed", "transformers"):
            raise ConfigError(f"runtime must be 'auto', 'packed' or 'transformers', got {self.runtime!r}")


@dataclass
class PushStageArgs:
    repo_id: str = field(default="", metadata={"help": "target Hub repository, e.g. user/model-int4"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to upload to"})
    create_pr: bool = field(default=False, metadata={"help": "open a pull request instead of committing"})
    dry_run: bool = field(default=False, metadata={"help": "list what would be uploaded; upload nothing"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message"})


# --------------------------------------------------------------------------------------------------------
# Stage kinds
# --------------------------------------------------------------------------------------------------------
@dataclass
class StageKind:
    config_classes: list
    run: Callable  # (context: StageContext) -> dict (the stage's summary, written to stage.json)
    produces_model: bool = False
    needs_input: bool = True
    required: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)  # dataclass name -> default overrides for recipes
    referenced_models: Callable = lambda stage: []


def _quantize_classes():
    from ..quantization.config import QuantizationConfig

    return [QuantizeStageArgs, QuantizationConfig]


def _distill_classes():
    from .distill import DistillScriptArguments
    from ..distillation.config import DistillationConfig

    return [DistillScriptArguments, DistillationConfig]


def _qad_classes():
    from .qad import QadStageArgs
    from ..distillation.config import DistillationConfig
    from ..quantization.config import QuantizationConfig

    # DistillationConfig before QuantizationConfig: a shared key (``seed``) is the training's.
    return [QadStageArgs, DistillationConfig, QuantizationConfig]


class _LazyKinds(dict):
    """Stage kinds whose config classes are imported on first use (keeps ``import hfcompress`` light)."""

    def __init__(self, factories):
        super().__init__()
        self._factories = factories

    def __contains__(self, key):
        return key in self._factories

    def __iter__(self):
        return iter(self._factories)

    def keys(self):
        return self._factories.keys()

    def __getitem__(self, key):
        if not super().__contains__(key):
            super().__setitem__(key, self._factories[key]())
        return super().__getitem__(key)


def _run_quantize(ctx):
    from .pipeline import quantize_stage

    return quantize_stage(ctx)


def _run_distill(ctx):
    from .pipeline import distill_stage

    return distill_stage(ctx)


def _run_qad(ctx):
    from .qad import qad_stage

    return qad_stage(ctx)


def _qad_refs(stage):
    teacher = stage.configs["QadStageArgs"].teacher
    return [teacher] if teacher else []


def _run_evaluate(ctx):
    from .pipeline import evaluate_stage

    return evaluate_stage(ctx)


def _run_push(ctx):
    from .pipeline import push_stage

    return push_stage(ctx)


def _evaluate_refs(stage):
    args = stage.configs["EvaluateStageArgs"]
    return list(args.models or []) + ([args.kl_to] if args.kl_to else [])


STAGE_KINDS = _LazyKinds({
    "distill": lambda: StageKind(config_classes=_distill_classes(), run=_run_distill, produces_model=True,
                                 defaults={"DistillationConfig": {"output_dir": "unused"}}),
    "quantize": lambda: StageKind(config_classes=_quantize_classes(), run=_run_quantize, produces_model=True),
    "qad": lambda: StageKind(config_classes=_qad_classes(), run=_run_qad, produces_model=True,
                             referenced_models=_qad_refs,
                             defaults={"DistillationConfig": {"output_dir": "unused", "save_strategy": "no",
                                                              "report_to": "none"}}),
    "evaluate": lambda: StageKind(config_classes=[EvaluateStageArgs], run=_run_evaluate,
                                  referenced_models=_evaluate_refs, needs_input=False),
    "push": lambda: StageKind(config_classes=[PushStageArgs], run=_run_push, required=("repo_id",)),
})


@dataclass
class StageContext:
    """What a running stage sees: its configs, where to write, and how to find other stages' models."""

    recipe: "object"
    stage: "object"
    index: int
    work_dir: Path          # write outputs here (renamed into place when the stage finishes)
    run_dir: Path
    resolve: Callable       # stage name / "model" / path -> model folder or Hub id
    default_input: str | None
    produced: list          # names of finished model-producing stages, in order
    progress: bool = True

    @property
    def input_model(self) -> str:
        from ..core.errors import ConfigError

        ref = self.stage.input or self.default_input
        if ref is None:
            raise ConfigError(f"stage {self.stage.name} has no input model")
        return self.resolve(ref)

    def config(self, name: str):
        return self.stage.configs[name]

    def write_json(self, name: str, payload) -> Path:
        path = self.work_dir / name
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        return path
