"""Quantization-aware distillation (QAD) as a job: a model's fake-quant copy learns from a full-precision
teacher — by default the model itself — then is converted and saved as a compressed-tensors checkpoint.

``load -> prepare_qat(copy) -> DistillationTrainer(model=copy, teacher_model=original) -> convert_qat -> save``.
The recipe stage ``qad`` runs it (see :mod:`.stages`); its keys are the fields of :class:`QadStageArgs`,
:class:`~hfcompress.distillation.config.DistillationConfig` (training) and
:class:`~hfcompress.quantization.config.QuantizationConfig` (bits, group_size, symmetric, ignore).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class QadStageArgs:
    teacher: str | None = field(default=None, metadata={
        "help": "full-precision teacher: 'model', an earlier stage, a path or Hub id; default: the stage's input "
                "model itself (its own fake-quant copy is the student)"})
    learn_scales: bool = field(default=False, metadata={
        "help": "learn the quantization scales (LSQ, Esser et al. 2019) instead of min-max scales of the weights"})
    dataset: str = field(default="stdlib", metadata={"help": "training text (any load_texts source)"})
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    text_column: str = field(default="text", metadata={"help": "text column of tabular datasets"})
    block_size: int = field(default=256, metadata={"help": "tokens per training block"})
    num_train_blocks: int | None = field(default=None, metadata={"help": "training blocks drawn (default: all)"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest safetensors shard of the checkpoint"})


def qad_to_folder(model_ref: str, out_dir, args: QadStageArgs, quantization, training, teacher_ref: str | None = None,
                  overwrite: bool = False, recipe_text: str | None = None, base_model: str | None = None) -> dict:
    """Run QAD on ``model_ref`` and save the quantized student to ``out_dir``; returns a summary dict."""
    from transformers import default_data_collator

    from ..core.data import BlockDataset, check_block_size, load_blocks
    from ..distillation.trainer import DistillationTrainer
    from ..models.loading import load_model, load_tokenizer, resolve_model
    from ..quantization.qat import convert_qat, prepare_qat
    from ..quantization.saving import save_checkpoint
    from .hub import build_model_card
    from .pipeline import _load_snippet, describe_data

    resolved = resolve_model(model_ref)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved)
    teacher = load_model(resolve_model(teacher_ref)) if teacher_ref else copy.deepcopy(model)
    check_block_size(args.block_size, model.config)
    blocks = load_blocks(args.dataset, tokenizer, args.block_size, split=args.dataset_split,
                         num_blocks=args.num_train_blocks, seed=training.seed, text_column=args.text_column)
    student = prepare_qat(model, quantization, learn_scales=args.learn_scales)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.qad-", dir=out_dir.parent))
    training.output_dir = str(scratch)  # trainer checkpoints/logs; the stage's output is the converted model
    try:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training,
                                      data_collator=default_data_collator, train_dataset=BlockDataset(blocks),
                                      processing_class=tokenizer)
        trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    student = convert_qat(trainer.accelerator.unwrap_model(trainer.model))
    del trainer, teacher

    settings = {**quantization.to_dict(), "learn_scales": args.learn_scales, "teacher": teacher_ref or "itself",
                "loss": training.loss, "temperature": training.temperature, "max_steps": training.max_steps,
                "learning_rate": training.learning_rate}
    name = Path(str(base_model or model_ref)).name
    card = build_model_card(
        title=f"{name} (QAD, {quantization.bits}-bit)", base_model=base_model or model_ref,
        method=f"quantization-aware distillation (fake-quant {quantization.bits}-bit student, "
               f"{training.loss} to the full-precision teacher), exported round-to-nearest",
        settings=settings, data_description="Training data: " + describe_data(args.dataset),
        recipe_text=recipe_text, tags=["quantized", "qat", "distillation"], load_snippet=_load_snippet(quantization))
    saved = save_checkpoint(student, out_dir, tokenizer=tokenizer, max_shard_size=args.max_shard_size,
                            overwrite=overwrite, extra_files={"README.md": str(card)})
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {"output": saved.name, "bits": quantization.bits, "group_size": quantization.group_size,
            "steps": len(history), "teacher": teacher_ref or "itself",
            "kd_loss_first": first.get("kd_loss"), "kd_loss_last": last.get("kd_loss")}


def qad_stage(ctx) -> dict:
    args = ctx.config("QadStageArgs")
    base = ctx.stage.input or ctx.default_input
    teacher = ctx.resolve(args.teacher) if args.teacher else None
    return qad_to_folder(ctx.input_model, ctx.work_dir, args, ctx.config("QuantizationConfig"),
                         ctx.config("DistillationConfig"), teacher_ref=teacher, overwrite=True,
                         recipe_text=ctx.recipe.source, base_model=ctx.recipe.model if base == "model" else base)
