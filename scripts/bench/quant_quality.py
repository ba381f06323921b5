"""Post-training quantization quality on a reference teacher: held-out perplexity relative to fp32.

Rows: fp32, cast bf16, int8 per-channel RTN, and RTN / GPTQ / AWQ at 4, 3 and 2 bits with group size 128
(the base teacher's 688-wide MLP uses the fallback group of 16 on ``down_proj``). Each configuration runs in
its own process (so its peak RSS is its own), on the same calibration and evaluation blocks, and reports
quantization wall time, peak RSS while quantizing, and the mean per-layer relative output error.

    python scripts/bench/quant_quality.py --size base --out scripts/bench/results/quant_quality.json

Calibration: ``--num-samples`` sequences of the model's context length from the stdlib *train* split
(seed 0). Evaluation: ``--eval-blocks`` blocks of the same length from the stdlib *test* split (seed 0),
scored with non-overlapping windows (``common.perplexity``). "gap closed" = (RTN - method) / (RTN - fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS = [
    ("fp32", dict(method=None)),
    ("cast bf16", dict(method="cast", dtype="bfloat16")),
    ("int8 RTN per-channel", dict(method="rtn", bits=8, group_size=None)),
] + [
    (f"int{bits} {name} g128", dict(method=method, bits=bits, group_size=128))
    for bits in (4, 3, 2) for name, method in (("RTN", "rtn"), ("GPTQ", "gptq"), ("AWQ", "awq"))
]
# --extra: the non-default knobs, at the hardest bit width that still works well.
EXTRA_ROWS = [
    ("int3 GPTQ in-order g128", dict(method="gptq", bits=3, group_size=128, act_order=False)),
    ("int3 GPTQ mse g128", dict(method="gptq", bits=3, group_size=128, observer="mse")),
    ("int3 RTN mse g128 (calibrated)", dict(method="rtn", bits=3, group_size=128, observer="mse")),
    ("int4 RTN asym g128", dict(method="rtn", bits=4, group_size=128, symmetric=False)),
    ("int4 GPTQ asym g128", dict(method="gptq", bits=4, group_size=128, symmetric=False)),
]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process, so the next peak is the quantizer's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return common.peak_rss_bytes()


def run_one(args) -> None:
    """Child process: quantize one configuration and score it; writes a JSON result to ``args.child_out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfcompress import QuantizationConfig, quantize

    spec = json.loads(args.child)
    blocks = common.load_blocks_file(args.blocks)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    result = {"name": spec["name"], "config": spec["config"], "fp32_weight_bytes": common.weight_bytes(model),
              "baseline_rss_bytes": common.current_rss_bytes(), "peak_reset": _reset_peak_rss()}
    started = time.perf_counter()
    if spec["config"]["method"] is not None:
        sizes = {"num_samples": blocks["calibration"].shape[0], "seq_len": blocks["calibration"].shape[1]}
        applies = QuantizationConfig(method=spec["config"]["method"]).applicable_fields()  # not for cast
        config = QuantizationConfig(**{k: v for k, v in sizes.items() if k in applies}, **spec["config"])
        uses_data = config.needs_calibration or config.observer == "mse"
        calibration = blocks["calibration"] if uses_data else None
        quantize(model, config, calibration_data=calibration, progress=False)
        report = model.hfcompress_report
        if report.layers:
            result["mean_layer_error_rtn"] = sum(l.error_before for l in report.layers) / len(report.layers)
            result["mean_layer_error"] = sum(l.error_after for l in report.layers) / len(report.layers)
            result["layer_error_metric"] = report.layers[0].metric
            result["fallback_group_sizes"] = report.fallbacks
    result["quantize_seconds"] = time.perf_counter() - started
    result["quantize_peak_rss_bytes"] = _peak_rss_since_reset()
    result["weight_bytes"] = common.weight_bytes(model)
    started = time.perf_counter()
    result["perplexity"] = common.perplexity(model, blocks["eval"])
    result["eval_seconds"] = time.perf_counter() - started
    common.write_json(args.child_out, result)


def make_blocks(model_dir: Path, num_samples: int, eval_blocks: int, path: Path) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from hfcompress.core.data import load_blocks

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seq_len = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    calibration = load_blocks("stdlib", tokenizer, seq_len, split="train", num_blocks=num_samples, seed=0)
    evaluation = load_blocks("stdlib", tokenizer, seq_len, split="test", num_blocks=eval_blocks, seed=0)
    common.save_blocks(path, calibration=calibration, eval=evaluation)
    return {"seq_len": seq_len, "calibration_blocks": num_samples, "eval_blocks": int(evaluation.shape[0]),
            "eval_tokens_scored": int(evaluation.shape[0] * (seq_len - 1))}


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(results: list[dict]) -> str:
    fp32 = next(r for r in results if r["name"] == "fp32")["perplexity"]
    rtn = {r["config"].get("bits"): r["perplexity"] for r in results
           if r["name"].endswith(" RTN g128") and "perplexity" in r}
    lines = ["| configuration | perplexity | vs fp32 | gap to fp32 closed vs RTN | mean layer output error (RTN -> "
             "method) | quantize s | peak RSS while quantizing, MiB (before) | weights MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        ppl = r["perplexity"]
        bits = r["config"].get("bits")
        closed = "-"
        if r["config"].get("method") in ("gptq", "awq") and bits in rtn and rtn[bits] != fp32:
            closed = f"{100 * (rtn[bits] - ppl) / (rtn[bits] - fp32):.0f}%"
        err = "-"
        if r.get("layer_error_metric") == "output":
            err = f"{r['mean_layer_error_rtn']:.4f} -> {r['mean_layer_error']:.4f}"
        lines.append(f"| {r['name']} | {ppl:.3f} | {100 * (ppl / fp32 - 1):+.2f}% | {closed} | {err} | "
                     f"{r['quantize_seconds']:.1f} | {_mib(r['quantize_peak_rss_bytes'])} "
                     f"({_mib(r['baseline_rss_bytes'])}) | {_mib(r['weight_bytes'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", help="reference teacher: tiny, small or base")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks scored")
    parser.add_argument("--only", nargs="*", help="run only the rows whose names contain one of these")
    parser.add_argument("--extra", action="store_true", help="also run in-order GPTQ / mse / asymmetric rows")
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_one(args)
        return 0

    from hfcompress.models.reference import reference_model

    model_dir = reference_model(args.size)
    rows = ROWS + (EXTRA_ROWS if args.extra else [])
    rows = [r for r in rows if not args.only or r[0] == "fp32" or any(o in r[0] for o in args.only)]
    results = []
    with tempfile.TemporaryDirectory(prefix="quant_quality-") as tmp:
        blocks_path = Path(tmp) / "blocks.safetensors"
        data = make_blocks(model_dir, args.num_samples, args.eval_blocks, blocks_path)
        for name, config in rows:
            child_out = Path(tmp) / f"{len(results)}.json"
            cmd = [sys.executable, __file__, "--out", args.out, "--child", json.dumps({"name": name, "config": config}),
                   "--child-out", str(child_out), "--blocks", str(blocks_path), "--model-dir", str(model_dir)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"name": name, "config": config, "error": last})
            else:
                results.append(json.loads(child_out.read_text()))
            print(f"{name}: {results[-1].get('perplexity', results[-1].get('error'))} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    payload = {"command": " ".join([Path(sys.executable).name] + sys.argv), "reference": args.size,
               "model_dir": str(model_dir), "data": data, "machine": common.machine_info(),
               "versions": common.package_versions(["torch", "transformers", "compressed-tensors"]),
               "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "results": results,
               "table": table(results)}
    common.write_json(args.out, payload)
    print(payload["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
