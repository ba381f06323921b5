#!/usr/bin/env python
"""Post-training quantization as a script, for ``python`` or ``accelerate launch``.

    python scripts/quantize.py --model reference:small --output out/int4 --method gptq --bits 4
    python scripts/quantize.py --config recipes/quantize-int4-gptq.yaml --output out/int4

Flags are the fields of ``QuantizationConfig`` plus the ones below (``--help`` lists them with defaults).
``--config`` takes a flat YAML mapping of those names, or a recipe (its first ``quantize`` stage is used, with
the recipe's ``model``); flags given on the command line win. Quantization is not data-parallel: under
``accelerate launch`` the main process quantizes and the others wait for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from hfcompress.core.errors import HFCompressError
from hfcompress.jobs.arguments import ArgumentParser
from hfcompress.quantization.config import QuantizationConfig


@dataclass
class QuantizeScriptArguments:
    model: str = field(default="reference:small", metadata={
        "help": "model folder, Hub id, or reference:<tiny|small|base>"})
    output: str = field(default="quantized", metadata={"help": "output folder (must not exist or be empty)"})
    calibration_data: str = field(default="stdlib", metadata={"help": "text source for calibration"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest safetensors shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})


def parse_args(argv: list[str]):
    parser = ArgumentParser((QuantizeScriptArguments, QuantizationConfig), config_kind="quantize",
                            prog="quantize.py")
    return parser.parse_into_dataclasses(argv)


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    from hfcompress.jobs.pipeline import run_quantize

    try:
        script_args, config = parse_args(list(sys.argv[1:] if argv is None else argv))
        state = PartialState()
        if state.is_main_process:
            out = run_quantize(script_args.model, script_args.output, config,
                               calibration_data=script_args.calibration_data, overwrite=script_args.overwrite,
                               max_shard_size=script_args.max_shard_size)
            print(f"wrote {out}")
        state.wait_for_everyone()
    except HFCompressError as exc:
        print(f"quantize.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        PartialState().destroy_process_group()  # as scripts/distill.py: released before exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
