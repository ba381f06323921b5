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


def _config(args, num_samples: int, seq_len: int, result: dict | None = None):
    """The QuantizationConfig of these arguments; records in ``result`` the GPTQ act_order that runs (the
    config's default when the command line leaves it unset)."""
    from hfcompress import QuantizationConfig

    kwargs = dict(method=args.method, bits=args.bits, group_size=args.group_size or None,
                  symmetric=not args.asymmetric, observer=args.observer, ignore=list(args.ignore),
                  num_samples=num_samples, seq_len=seq_len, damp=args.damp,
                  seed=getattr(args, "seed", 0), calibration_dtype=getattr(args, "calibration_dtype", None))
    if args.act_order is not None:
        kwargs["act_order"] = args.act_order
    if getattr(args, "no_static_groups", False):
        kwargs["static_groups"] = False
    if getattr(args, "no_true_sequential", False):
        kwargs["true_sequential"] = False
    if args.method == "cast":
        kwargs = dict(method="cast", dtype=args.dtype, ignore=list(args.ignore))
    config = QuantizationConfig(**kwargs)
    if result is not None and config.method == "gptq":
        result["actorder"] = config.act_order
        result["true_sequential"] = config.true_sequential
    return config


def _awq_settings(args, result: dict) -> None:
    """AWQ's search settings are module constants of ``hfcompress.quantization.awq`` (no config field): the
    defaults sweep changes them here, in this one-measurement process, and records what ran."""
    from hfcompress.quantization import awq

    if args.awq_grid is not None:
        awq.AWQ_GRID = args.awq_grid
    if args.awq_search_tokens is not None:
        awq.AWQ_SEARCH_TOKENS = args.awq_search_tokens
    if args.awq_no_clip:
        awq.AWQ_CLIP = False
    result.update(awq_grid=awq.AWQ_GRID, awq_search_tokens=awq.AWQ_SEARCH_TOKENS, awq_clip=awq.AWQ_CLIP)


def _fields(args) -> dict:
    return {"tool": "hfcompress", "method": args.method, "bits": args.bits if args.method != "cast" else None,
            "group_size": args.group_size or None, "symmetric": not args.asymmetric,
            "actorder": args.act_order,
            "observer": args.observer, "ignore": list(args.ignore), "seed": getattr(args, "seed", 0),
            "static_groups": not getattr(args, "no_static_groups", False),
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
        # The random speed model has no tokenizer; text is never needed here (calibration is token ids).
        has_tokenizer = (Path(args.model) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
        if args.seed and args.method in ("gptq", "awq"):
            # Another calibration draw: run.py draws the blocks file's calibration sequences with seed 0 this
            # way; a pre-tokenized tensor is used as given, so QuantizationConfig.seed alone would not change it.
            from hfcompress.core.data import load_blocks

            calibration = load_blocks("stdlib", tokenizer, int(calibration.shape[1]), split="train",
                                      num_blocks=int(calibration.shape[0]), seed=args.seed)
        result["fp32_weight_bytes"] = common.weight_bytes(model)
        result["baseline_rss_bytes"] = common.current_rss_bytes()
        result["num_calibration_blocks"] = int(calibration.shape[0]) if args.method in ("gptq", "awq") else 0
        if args.method == "awq":
            _awq_settings(args, result)
        if args.method != "fp32":
            config = _config(args, int(calibration.shape[0]), int(calibration.shape[1]), result)
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
        if args.kl and not args.no_eval:  # the fp32 model again, loaded after the peak RSS was taken
            reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            result["kl_to_fp32"], result["perplexity"] = common.kl_and_perplexity(reference, model, blocks["eval"])
            del reference
        elif not args.no_eval:
            result["perplexity"] = common.perplexity(model, blocks["eval"])
        if args.save:
            model.save_pretrained(args.save)
            if tokenizer is not None:
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
            config = _config(args, int(calibration.shape[0]), int(calibration.shape[1]), result)
            start = time.perf_counter()
            quantize(model, config, calibration_data=calibration if config.needs_calibration else None,
                     progress=False)
            result["quantize_seconds"] = time.perf_counter() - start
        candidate = common.mean_pooled_embeddings(model, data["eval_input_ids"], data["eval_attention_mask"])
        result.update(common.embedding_agreement(reference, candidate))
        result["weight_bytes"] = common.weight_bytes(model)
        result["num_sentences"] = int(data["eval_input_ids"].shape[0])

    return common.run_and_record(args.out, _fields(args), body)


def cmd_speed(args) -> int:
    """Batch-1 greedy prefill/decode speed and in-memory weight bytes of one way of loading a model.

    ``fp32`` / ``bf16``: the fp model with plain transformers. ``packed``: a compressed-tensors checkpoint
    through ``hfcompress.load_compressed`` (weights stay packed; native int8/int4 kernels). ``plain``: the
    same checkpoint through plain ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors decompresses).
    """
    fields = {"tool": "hfcompress" if args.variant == "packed" else "transformers", "variant": args.variant,
              "dtype": args.dtype, "model": str(args.model),
              "versions": common.package_versions(VERSIONS)}

    def body(result: dict) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if args.threads:
            torch.set_num_threads(args.threads)
        common.seed_everything(0)
        dtype = getattr(torch, args.dtype)
        start = time.perf_counter()
        if args.variant == "packed":
            from hfcompress import load_compressed

            model = load_compressed(args.model, dtype=dtype, progress=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        result["load_seconds"] = time.perf_counter() - start
        model.eval()
        result["weight_bytes"] = common.weight_bytes(model)
        result["float_linear_layers"] = len(common.float_linear_layers(model))
        blocks = common.load_blocks_file(args.blocks) if args.blocks else {}
        if "eval" in blocks and int(blocks["eval"].max()) < model.config.vocab_size:
            prompt = blocks["eval"][:1, : args.prompt_tokens]
        else:
            prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens),
                                   generator=torch.Generator().manual_seed(0))
        result["speed"] = common.generation_speed(model, prompt, new_tokens=args.new_tokens, repeats=args.repeats,
                                                  pad_token_id=model.config.eos_token_id)
        result["threads"] = torch.get_num_threads()
        result["peak_rss_bytes"] = common.peak_rss_bytes()

    return common.run_and_record(args.out, fields, body)


def cmd_distill(args) -> int:
    """Train the shared student initialisation with hfcompress's DistillationTrainer (or cross-entropy only)."""
    fields = {"tool": "hfcompress", "objective": args.objective, "steps": args.steps, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate, "bf16": args.bf16, "versions": common.package_versions(VERSIONS)}

    def body(result: dict) -> None:
        import tempfile

        from hfcompress import DistillationConfig, DistillationTrainer
        from hfcompress.core.data import BlockDataset

        blocks, train, tokenizer, teacher, student = common.distill_inputs(args)
        objective = {
            # the same objective as TRL's GKDTrainer(beta=0): forward KL(teacher || student) at T = 1
            "forward_kl": dict(loss="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, hidden_weight=0.0),
            "ce": dict(kd_weight=0.0, ce_weight=1.0, hidden_weight=0.0),
            "default": {},
        }[args.objective]
        with tempfile.TemporaryDirectory() as output_dir:
            config = DistillationConfig(
                output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                gradient_checkpointing=False, bf16=args.bf16, fp16=False, logging_steps=max(1, args.steps // 5),
                save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_drop_last=True, use_cpu=True,
                disable_tqdm=True, **objective)
            timer = common.step_timer()
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                          train_dataset=BlockDataset(train), processing_class=tokenizer,
                                          callbacks=[timer])
            common.timed_training(result, trainer, timer, args.steps, args.batch_size * int(train.shape[1]),
                                  blocks["eval"])
            if args.save:
                trainer.save_model(args.save)
                tokenizer.save_pretrained(args.save)

    return common.run_and_record(args.out, fields, body)


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
        p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                       help="gptq: activation ordering (default: QuantizationConfig's, i.e. on)")
        p.add_argument("--observer", default="minmax", choices=["minmax", "mse"])
        p.add_argument("--damp", type=float, default=0.01)
        p.add_argument("--calibration-dtype", default=None, choices=["bfloat16", "float16"],
                       help="gptq/awq: calibration forward passes under autocast in this dtype")
        p.add_argument("--dtype", default="bfloat16", help="target dtype of --method cast")
        p.add_argument("--ignore", nargs="*", default=["lm_head"])
        p.add_argument("--num-calibration", type=int, default=None)
        p.add_argument("--seed", type=int, default=0,
                       help="quant, gptq/awq: draw the calibration sequences anew with this seed (0: the blocks "
                            "file's); also QuantizationConfig.seed")
        p.add_argument("--kl", action="store_true", help="quant: also the mean KL to the fp32 model on eval")
        p.add_argument("--no-static-groups", action="store_true", help="gptq: static_groups=False")
        p.add_argument("--no-true-sequential", action="store_true",
                       help="gptq: true_sequential=False (two passes per layer, llm-compressor's order)")
        p.add_argument("--awq-grid", type=int, default=None, help="awq: scale candidates (awq.AWQ_GRID)")
        p.add_argument("--awq-search-tokens", type=int, default=None,
                       help="awq: calibration tokens of the block-error scale search (awq.AWQ_SEARCH_TOKENS)")
        p.add_argument("--awq-no-clip", action="store_true", help="awq: skip the clipping search (awq.AWQ_CLIP)")
        p.add_argument("--save", default=None)
        p.add_argument("--no-eval", action="store_true", help="skip perplexity (speed-only models)")
        p.add_argument("--out", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--model", required=True)
    p.add_argument("--variant", required=True, choices=["fp32", "bf16", "packed", "plain"])
    p.add_argument("--dtype", default="float32", help="activation dtype (packed: bfloat16 recommended)")
    p.add_argument("--blocks", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("distill")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--blocks", required=True)
    p.add_argument("--objective", default="forward_kl", choices=["forward_kl", "ce", "default"])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (TrainingArguments.bf16)")
    p.add_argument("--save", default=None)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"quant": cmd_quant, "embed": cmd_embed, "speed": cmd_speed, "distill": cmd_distill}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
