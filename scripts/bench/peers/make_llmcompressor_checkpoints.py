"""Write llm-compressor checkpoints of a small model, for testing ``hfcompress.load_compressed`` against them.

Runs in the peer venv. For each scheme below it quantizes the model with llm-compressor, saves the
compressed-tensors checkpoint (``save_compressed=True``, the format vLLM reads) into ``OUT_DIR/<name>``, and
beside it ``expected_logits.safetensors``: ``input_ids`` (2, T) and the ``logits`` (2, T, V) that the
llm-compressor model produced in memory right after quantization, so a loader can be checked against the
writer's own numbers.

    .venv-peers/bin/python peers/make_llmcompressor_checkpoints.py --model DIR --blocks blocks.safetensors \
        --out-dir scripts/bench/work/llmcompressor-checkpoints
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from llmcompressor_oneshot import build_recipe  # noqa: E402

# name -> (method, bits, group_size or None, symmetric, load dtype)
SCHEMES = {
    "w4a16-g{g}-gptq": ("gptq", 4, "g", True, "float32"),
    "w4a16-g{g}-gptq-bf16": ("gptq", 4, "g", True, "bfloat16"),
    "w4a16-asym-g{g}-rtn": ("rtn", 4, "g", False, "float32"),
    "w8a16-channel-rtn": ("rtn", 8, None, True, "float32"),
    "w4a16-channel-rtn": ("rtn", 4, None, True, "float32"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--blocks", required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blocks = common.load_blocks_file(args.blocks)
    calibration = blocks["calibration"]
    probe = blocks["eval"][:2]  # (2, T)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"source_model": str(args.model), "versions": common.package_versions(
        ["llmcompressor", "compressed-tensors", "transformers", "torch"]), "checkpoints": {}}
    for template, (method, bits, group, symmetric, dtype) in SCHEMES.items():
        group_size = args.group_size if group == "g" else None
        name = template.format(g=args.group_size)
        target = out_dir / name
        common.seed_everything(0)
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype))
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                         "attention_mask": torch.ones_like(calibration).tolist()})
            recipe = build_recipe(method, bits, group_size, symmetric, ["lm_head"], 0.01, False)
            kwargs = dict(dataset=dataset, num_calibration_samples=int(calibration.shape[0]),
                          shuffle_calibration_samples=False, max_seq_length=int(calibration.shape[1]),
                          pipeline="sequential") if method != "rtn" else {}
            oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
            with torch.no_grad():
                logits = model(input_ids=probe).logits.float()  # (2, T, V)
            model.save_pretrained(target, save_compressed=True)
            tokenizer.save_pretrained(target)
            from safetensors.torch import save_file

            save_file({"input_ids": probe.contiguous(), "logits": logits.contiguous()},
                      str(target / "expected_logits.safetensors"))
            manifest["checkpoints"][name] = {"method": method, "bits": bits, "group_size": group_size,
                                             "symmetric": symmetric, "dtype": dtype, "status": "ok"}
        except Exception as exc:  # record and go on with the other schemes
            manifest["checkpoints"][name] = {"status": "error", "error": common.error_line(exc)}
        print(name, manifest["checkpoints"][name]["status"], flush=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
