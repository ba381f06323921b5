"""Command-line arguments of ``scripts/distill.py`` (and ``hfcompress distill``), and the run they describe.

``parse_distill_args(argv)`` reads ``transformers.HfArgumentParser`` flags for two dataclasses,
:class:`DistillScriptArguments` (models and data) and :class:`~hfcompress.distillation.config.DistillationConfig`
(training), optionally starting from ``--config file.yaml`` whose keys are fields of either; flags given on
the command line override the file. ``distill_from_args`` runs the distillation they describe.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..distillation.config import DistillationConfig
from .arguments import ArgumentParser

logger = logging.getLogger(__name__)


@dataclass
class DistillScriptArguments:
    """Which teacher, which student, which data."""

    teacher: str = field(
        default="reference:small",
        metadata={"help": "Teacher: a model folder, a Hub id, or reference:<tiny|small|base> (the cached "
                          "reference teachers)."},
    )
    student: str = field(
        default="from-teacher",
        metadata={"help": "Student: a model folder / Hub id, or 'from-teacher' to build one from the teacher with "
                          "make_student (see student_num_layers)."},
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "For student='from-teacher': number of layers (default: half the teacher's)."},
    )
    student_hidden_size: int | None = field(
        default=None, metadata={"help": "For student='from-teacher': narrower hidden size (default: teacher's)."})
    student_intermediate_size: int | None = field(
        default=None, metadata={"help": "For student='from-teacher': narrower MLP size (default: teacher's)."})
    student_layer_selection: str = field(
        default="uniform",
        metadata={"help": "For student='from-teacher': 'uniform' (every k-th teacher layer), 'keep-last' (the "
                          "same, with the teacher's last layer as the student's last) or comma-separated teacher "
                          "layer indices such as '1,3,5,7'."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "mode='cache': the teacher cache folder (`hfcompress cache-teacher`); training then runs "
                          "on its blocks (dataset is not read) and the teacher is not loaded."},
    )
    dataset: str = field(
        default="stdlib",
        metadata={"help": "Training text: any hfcompress.core.data.load_texts source ('stdlib', a file or folder, a "
                          "datasets name)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out text for evaluation during training (e.g. 'stdlib:validation'); none by "
                          "default."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of tabular datasets."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block (<= the teacher's context)."})
    num_train_blocks: int | None = field(
        default=None, metadata={"help": "Number of training blocks drawn from the data (default: all)."})
    num_eval_blocks: int | None = field(
        default=64, metadata={"help": "Number of evaluation blocks drawn from eval_dataset."})


def parse_distill_args(argv: list[str] | None = None) -> tuple[DistillScriptArguments, DistillationConfig]:
    """Flags (and ``--config file.yaml``) -> (DistillScriptArguments, DistillationConfig).

    The YAML file is a flat mapping or a recipe (its first ``distill`` stage, see
    :func:`hfcompress.jobs.arguments.read_config_file`). Keys must be fields of one of the two dataclasses; an
    unknown key raises ``ConfigError`` naming the closest field. ``output_dir`` defaults to ``distill-output``.
    """
    parser = ArgumentParser((DistillScriptArguments, DistillationConfig), config_kind="distill")
    parser.set_defaults(output_dir="distill-output")
    return parser.parse_into_dataclasses(list(argv) if argv is not None else [])


def _layer_selection(text: str):
    from ..distillation.student import LAYER_SELECTIONS

    if text in LAYER_SELECTIONS:
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"student_layer_selection must be 'uniform', 'keep-last' or comma-separated layer "
                          f"indices, got {text!r}") from None


def build_student(script_args: DistillScriptArguments):
    """The student named by the arguments (loaded, or made from the teacher)."""
    from ..models.loading import load_model
    from ..distillation.hidden import num_layers
    from ..distillation.student import make_student

    if script_args.student != "from-teacher":
        return load_model(script_args.student)
    teacher = load_model(script_args.teacher)  # full precision: make_student copies its weights
    layers = script_args.student_num_layers
    if layers is None:
        layers = max(1, num_layers(teacher) // 2)
    return make_student(teacher, num_layers=layers, hidden_size=script_args.student_hidden_size,
                        intermediate_size=script_args.student_intermediate_size,
                        layer_selection=_layer_selection(script_args.student_layer_selection))


def distill_from_args(script_args: DistillScriptArguments, config: DistillationConfig) -> Path:
    """Run the distillation the arguments describe; returns the folder of the saved student."""
    from transformers import default_data_collator

    from ..core.data import BlockDataset, check_block_size, load_blocks
    from ..models.loading import load_tokenizer, resolve_model
    from ..distillation.teachers import teacher_tokenizer
    from ..distillation.trainer import DistillationTrainer

    teacher_path = resolve_model(script_args.teacher)
    tokenizer = load_tokenizer(teacher_path)
    student = build_student(script_args)
    if script_args.student != "from-teacher":
        # A student with its own tokenizer is trained and saved with it; the trainer refuses it when its token
        # ids differ from the teacher's (logit distillation compares the two models' rows token by token).
        tokenizer = teacher_tokenizer(script_args.student) or tokenizer
    check_block_size(script_args.block_size, student.config)
    train_dataset = None  # mode='cache': the cache's own blocks
    if config.mode != "cache":
        train_dataset = BlockDataset(load_blocks(
            script_args.dataset, tokenizer, script_args.block_size, split=script_args.dataset_split,
            num_blocks=script_args.num_train_blocks, seed=config.seed, text_column=script_args.text_column))
    eval_dataset = None
    if script_args.eval_dataset:
        eval_blocks = load_blocks(script_args.eval_dataset, tokenizer, script_args.block_size, split="validation",
                                  num_blocks=script_args.num_eval_blocks, seed=config.seed,
                                  text_column=script_args.text_column)
        eval_dataset = BlockDataset(eval_blocks)
    # mode='cache' checks the cache against the teacher's name; mode='self' has no separate teacher.
    trainer = DistillationTrainer(model=student, teacher_model=None if config.mode == "self" else teacher_path,
                                  teacher_cache=script_args.teacher_cache, args=config,
                                  data_collator=default_data_collator, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    return Path(config.output_dir)
