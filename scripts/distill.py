#!/usr/bin/env python
"""Distil a teacher into a smaller student; run directly or under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 scripts/distill.py \
        --teacher reference:base --student from-teacher --student_num_layers 4 \
        --output_dir out/student --max_steps 300 --per_device_train_batch_size 8

Flags are the fields of ``DistillScriptArguments`` (teacher, student, data) and ``DistillationConfig``
(``TrainingArguments`` plus the distillation fields); ``--config run.yaml`` reads the same names from YAML,
and flags override it. ``--help`` lists them all.
"""

from __future__ import annotations

import logging
import sys

from hfcompress.jobs.distill import distill_from_args, parse_distill_args
from hfcompress.core.errors import HFCompressError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from accelerate import PartialState

    try:
        script_args, config = parse_distill_args(sys.argv[1:] if argv is None else argv)
        output = distill_from_args(script_args, config)
    except HFCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        # The launched process owns the process group: release it before exit, or gloo's threads may still be
        # running when the interpreter tears down (seen as "terminate called without an active exception").
        PartialState().destroy_process_group()
    if config.process_index == 0:
        print(f"student saved to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
