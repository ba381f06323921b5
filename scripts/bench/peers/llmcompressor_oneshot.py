"""llm-compressor peer: ``oneshot`` with ``GPTQModifier`` / ``AWQModifier`` / ``QuantizationModifier`` (RTN).

Runs in the peer venv. Reads the shared token blocks written by run.py, calibrates on the ``calibration``
blocks (no shuffling, batch 1, sequence length = block length), scores held-out perplexity on the ``eval``
blocks with ``common.perplexity``, saves the compressed-tensors checkpoint and reports wall time of the
``oneshot`` call, peak RSS and checkpoint bytes.

    .venv-peers/bin/python peers/llmcompressor_oneshot.py --model DIR --blocks blocks.safetensors \
        --method gptq --bits 4 --group-size 128 --save OUT_DIR --out result.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def build_recipe(method: str, bits: int, group_size: int | None, symmetric: bool, ignore: list[str],
                 dampening: float, actorder: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric,
        strategy="group" if group_size else "channel", group_size=group_size, observer="minmax",
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    config_groups = {"group_0": scheme}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=config_groups, ignore=ignore, dampening_frac=dampening,
                             block_size=128, actorder="static" if actorder else None)]
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=ignore)]
    if method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=config_groups, ignore=ignore)]
    raise SystemExit(f"unknown method {method!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fp32 model folder")
    parser.add_argument("--blocks", required=True, help="safetensors with 'calibration' and 'eval' blocks")
    parser.add_argument("--method", choices=["gptq", "awq", "rtn"], required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128, help="0 = per output channel")
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--actorder", action="store_true", help="GPTQ static activation ordering")
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--ignore", nargs="*", default=["lm_head"],
                        help="llm-compressor ignore list (names or 're:' regexes)")
    parser.add_argument("--num-calibration", type=int, default=None, help="default: all calibration blocks")
    parser.add_argument("--patch-pin-memory", action="store_true",
                        help="make llm-compressor's activation-cache pin_memory a no-op (it fails on machines "
                             "without an accelerator; pinning only speeds host-to-device copies, no numeric effect)")
    parser.add_argument("--save", default=None, help="write the compressed checkpoint here")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity (timing-only repeats)")
    parser.add_argument("--kl", action="store_true", help="also the mean KL to the fp32 model on eval")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    group_size = args.group_size or None
    fields = {"tool": "llm-compressor", "method": args.method, "bits": args.bits, "group_size": group_size,
              "symmetric": not args.asymmetric, "actorder": args.actorder, "ignore": args.ignore,
              "patched_pin_memory": args.patch_pin_memory,
              "versions": common.package_versions(["llmcompressor", "compressed-tensors", "transformers",
                                                   "torch"])}

    def body(result: dict) -> None:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common.seed_everything(0)
        blocks = common.load_blocks_file(args.blocks)
        calibration = blocks["calibration"][: args.num_calibration]  # (N, T)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        result["baseline_rss_bytes"] = common.current_rss_bytes()
        result["num_calibration_blocks"] = int(calibration.shape[0])
        dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                     "attention_mask": torch.ones_like(calibration).tolist()})
        recipe = build_recipe(args.method, args.bits, group_size, not args.asymmetric, args.ignore,
                              args.dampening, args.actorder)

        from llmcompressor import oneshot

        if args.patch_pin_memory:
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *a, **k: None

        start = time.perf_counter()
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
                num_calibration_samples=int(calibration.shape[0]), shuffle_calibration_samples=False,
                max_seq_length=int(calibration.shape[1]), batch_size=1, pipeline="sequential")
        result["quantize_seconds"] = time.perf_counter() - start
        result["peak_rss_bytes"] = common.peak_rss_bytes()
        if not args.no_eval:
            result.update(common.score_against_fp32(model, args.model, blocks["eval"], args.kl))
        if args.save:
            model.save_pretrained(args.save, save_compressed=True)
            tokenizer.save_pretrained(args.save)
            result["checkpoint_dir"] = str(args.save)
            result["checkpoint_bytes"] = common.checkpoint_bytes(args.save)

    return common.run_and_record(args.out, fields, body)


if __name__ == "__main__":
    sys.exit(main())
