#!/usr/bin/env python
"""Distill, then quantize — against quantizing the teacher alone to the same size budget.

    python scripts/bench/pipeline_bench.py --teacher DIR --student STUDENT_INIT --blocks blocks.safetensors \
        --steps 300 --out pipeline.json

Rows (each measured in its own process by ``ours.py``, on the shared eval blocks):

1. the teacher (fp32);
2. the distilled student: half the teacher's layers (``make_student``), trained with the
   ``DistillationConfig`` defaults for ``--steps`` steps on the shared train blocks;
3. that student quantized: int8 per-channel RTN and int4 GPTQ (group ``--group-size``);
4. the teacher quantized with GPTQ at int4, int3 and int2 — the size budget is the int4 student's checkpoint;
   the rows whose checkpoint fits in it (within 5%) are the fair "teacher alone" competitors.

Size = checkpoint bytes on disk and weight bytes in memory; speed = batch-1 greedy decode/prefill tokens/s
(fp32 models with plain transformers, quantized ones with ``hfcompress.load_compressed`` in bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402

_run = common.run_ours  # one measurement per process (its own peak RSS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, help="student initialisation folder (half depth)")
    parser.add_argument("--blocks", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    blocks = ["--blocks", args.blocks]
    speed_args = ["--new-tokens", args.new_tokens, "--repeats", args.repeats, "--prompt-tokens", 32]
    rows: list[dict] = []
    errors: list[str] = []

    def measure(label: str, role: str, model: Path, method: str, bits: int | None, quant_args: list,
                save: Path | None) -> dict:
        tag = label.replace(" ", "_").replace("/", "-")
        result = _run(["quant", "--model", model, *blocks, "--method", method, *quant_args,
                       *(["--save", save] if save else [])], work / f"{tag}.json", work / f"{tag}.log")
        row = {"label": label, "role": role, "method": method, "bits": bits, **{
            k: result.get(k) for k in ("status", "error", "perplexity", "weight_bytes", "checkpoint_bytes",
                                       "quantize_seconds")}}
        if method == "fp32":
            row["checkpoint_bytes"] = common.checkpoint_bytes(model)
        if result.get("status") == "ok":
            variant = ["--variant", "fp32", "--dtype", "float32"] if save is None else \
                ["--variant", "packed", "--dtype", "bfloat16"]
            speed = _run(["speed", "--model", save or model, *blocks, *variant, *speed_args],
                         work / f"{tag}-speed.json", work / f"{tag}-speed.log")
            if speed.get("status") == "ok":
                row["decode_tokens_per_s"] = speed["speed"]["decode_tokens_per_s"]
                row["prefill_tokens_per_s"] = speed["speed"]["prefill_tokens_per_s"]
                row["runtime_weight_bytes"] = speed["weight_bytes"]
            else:
                row["speed_error"] = speed.get("error")
                errors.append(f"{label} speed: {speed.get('error')}")
        else:
            errors.append(f"{label}: {result.get('error')}")
        rows.append(row)
        print(f"{label}: {row.get('status')} ppl={row.get('perplexity')}", flush=True)
        return row

    def payload():
        return {"rows": rows, "errors": errors, "steps": args.steps, "batch_size": args.batch_size,
                "group_size": args.group_size, "teacher": str(args.teacher), "student_init": str(args.student)}

    def body(result: dict) -> None:
        teacher = Path(args.teacher)
        distilled = work / "student-distilled"
        train = _run(["distill", "--teacher", teacher, "--student", args.student, *blocks, "--objective", "default",
                      "--steps", args.steps, "--batch-size", args.batch_size, "--save", distilled],
                     work / "distill.json", work / "distill.log")
        result["distill"] = {k: train.get(k) for k in ("status", "error", "tokens_per_s", "train_seconds",
                                                       "perplexity", "final_train_loss")}
        measure("teacher fp32", "teacher", teacher, "fp32", 32, [], None)
        if train.get("status") != "ok":
            raise RuntimeError(f"distillation failed: {train.get('error')}")
        measure("distilled student fp32", "student", distilled, "fp32", 32, [], None)
        measure("student int8 RTN", "student", distilled, "rtn", 8, ["--bits", 8, "--group-size", 0],
                work / "ckpt-student-int8")
        g = args.group_size
        budget = measure(f"student int4 GPTQ g{g}", "student", distilled, "gptq", 4,
                         ["--bits", 4, "--group-size", g], work / "ckpt-student-int4")
        for bits in (4, 3, 2):
            measure(f"teacher int{bits} GPTQ g{g}", "teacher", teacher, "gptq", bits,
                    ["--bits", bits, "--group-size", g], work / f"ckpt-teacher-int{bits}")
        limit = budget.get("checkpoint_bytes")
        for row in rows:
            row["fits_budget"] = bool(limit and row.get("checkpoint_bytes") and
                                      row["checkpoint_bytes"] <= 1.05 * limit)
        result["budget_bytes"] = limit
        result.update(payload())

    code = common.run_and_record(args.out, {"tool": "hfcompress", "pipeline": "distill then quantize"}, body)
    if code:  # keep whatever rows were measured before the failure
        saved = json.loads(Path(args.out).read_text())
        saved.update(payload())
        common.write_json(args.out, saved)
    return code


if __name__ == "__main__":
    sys.exit(main())
