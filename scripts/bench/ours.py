"""hfcompress's side of the matched comparisons: the same model, blocks, settings and measurements as the peers.

Runs in the project's environment, one measurement per process (run.py starts it as a subprocess), and
writes the same JSON fields as the peer scripts so the two sides land in one table.

    python scripts/bench/ours.py quant --model DIR --blocks blocks.safetensors --method gptq --bits 4 \
        --group-size 128 --out result.json [--save DIR]
    python scripts/bench/ours.py embed --model MINILM_DIR --blocks embed.safetensors --method rtn --bits 8 \
        --group-size 0 --out result.json
    python scripts/bench/ours.py speed --model DIR --variant int4 --blocks blocks.safetensors --out result.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VERSIONS = ["hfcompress", "transformers", "torch", "compressed-tensors", "bitsandbytes"]


def _config(args, num_samples: int, seq_len: int):
    from hfcompress import QuantizationConfig

    kwargs = dict(method=args.method, bits=args.bits, group_size=args.group_size or None,
                  symmetric=not args.asymmetric, observer=args.observer, ignore=list(args.ignore),
                  num_samples=num_samples, seq_len=seq_len, damp=args.damp, act_order=args.act_order, seed=0)
    if args.method == "cast":
        kwargs = dict(method="cast", dtype=args.dtype, ignore=list(args.ignore))
    return QuantizationConfig(**kwargs)


def _fields(args) -> dict:
    return {"tool": "hfcompress", "method": args.method, "bits": args.bits if args.method != "cast" else None,
            "group_size": args.group_size or None, "symmetric": not args.asymmetric, "actorder": args.act_order,
            "observer": args.observer, "ignore": list(args.ignore),
            "versions": common.package_versions(VERSIONS)}


def cmd_quant(args) -> int:
    """Quantize a causal LM with hfcompress on the shared calibration blocks; score the shared eval blocks."""

    def body(result: dict) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hfcompress import quantize

        common.seed_everything(0)
        blocks = common.load_blocks_file(args.blocks)
        calibration = blocks["calibration"][: args.num_calibration]  # (N, T)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        result["fp32_weight_bytes"] = common.weight_bytes(model)
        result["baseline_rss_bytes"] = common.current_rss_bytes()
        result["num_calibration_blocks"] = int(calibration.shape[0]) if args.method in ("gptq", "awq") else 0
        config = _config(args, int(calibration.shape[0]), int(calibration.shape[1]))
        data = calibration if config.needs_calibration else None
        start = time.perf_counter()
        quantize(model, config, calibration_data=data, tokenizer=tokenizer, progress=False)
        result["quantize_seconds"] = time.perf_counter() - start
        result["peak_rss_bytes"] = common.peak_rss_bytes()
        result["weight_bytes"] = common.weight_bytes(model)
        result["float_linear_layers"] = len(common.float_linear_layers(model))
        report = getattr(model, "hfcompress_report", None)
        if report is not None and hasattr(report, "fallbacks"):
            result["fallback_layers"] = report.fallbacks
        result["perplexity"] = common.perplexity(model, blocks["eval"])
        if args.save:
            model.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
            result["checkpoint_dir"] = str(args.save)
            result["checkpoint_bytes"] = common.checkpoint_bytes(args.save)

    return common.run_and_record(args.out, _fields(args), body)


def cmd_embed(args) -> int:
    """Embedding agreement of a quantized sentence encoder (all-MiniLM-L6-v2) with its fp32 self."""

    def body(result: dict) -> None:
        import torch
        from transformers import AutoModel

        from hfcompress import quantize

        common.seed_everything(0)
        data = common.load_blocks_file(args.blocks)
        model = AutoModel.from_pretrained(args.model, dtype=torch.float32)
        reference = common.mean_pooled_embeddings(model, data["eval_input_ids"], data["eval_attention_mask"])
        result["fp32_weight_bytes"] = common.weight_bytes(model)
        if args.method != "fp32":
            calibration = data["calibration"][: args.num_calibration]  # (N, T) packed sentences
            config = _config(args, int(calibration.shape[0]), int(calibration.shape[1]))
            start = time.perf_counter()
            quantize(model, config, calibration_data=calibration if config.needs_calibration else None,
                     progress=False)
            result["quantize_seconds"] = time.perf_counter() - start
        candidate = common.mean_pooled_embeddings(model, data["eval_input_ids"], data["eval_attention_mask"])
        result.update(common.embedding_agreement(reference, candidate))
        result["weight_bytes"] = common.weight_bytes(model)
        result["num_sentences"] = int(data["eval_input_ids"].shape[0])

    return common.run_and_record(args.out, _fields(args), body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("quant", "embed"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--blocks", required=True)
        p.add_argument("--method", required=True, choices=["fp32", "cast", "rtn", "gptq", "awq"])
        p.add_argument("--bits", type=int, default=4)
        p.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
        p.add_argument("--asymmetric", action="store_true")
        p.add_argument("--act-order", action="store_true")
        p.add_argument("--observer", default="minmax", choices=["minmax", "mse"])
        p.add_argument("--damp", type=float, default=0.01)
        p.add_argument("--dtype", default="bfloat16", help="target dtype of --method cast")
        p.add_argument("--ignore", nargs="*", default=["lm_head"])
        p.add_argument("--num-calibration", type=int, default=None)
        p.add_argument("--save", default=None)
        p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"quant": cmd_quant, "embed": cmd_embed}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
