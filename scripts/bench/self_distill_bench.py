"""Self-distillation for depth truncation: does teaching an early exit beat cutting the model and fine-tuning?

Three ways to get a ``--layers K`` model out of a deeper one, at an equal number of training steps:

* ``truncate``: keep the first K layers (with the final norm and LM head), no training;
* ``truncate+ce``: truncate, then ``--steps`` of cross-entropy on the truncated model;
* ``self``: ``--steps`` of ``DistillationConfig(mode="self", exit_layers=[K-1])`` on the full model (its final
  layer teaches the exit through the shared norm and head, plus cross-entropy on the final layer), then truncate;
* ``self (EMA teacher)``: the same with ``self_teacher="ema"`` (an exponential moving average of the model, decay
  ``--ema-decay``, teaches the exit and the final layer instead of the model's own current outputs), then truncate.

Perplexity on held-out text and KL to the full model for each, plus the full model itself.

    python scripts/bench/self_distill_bench.py --model reference:small --layers 2 --steps 200

About 1 minute for reference:tiny (--steps 50) on 2 CPU cores; reference:small with 200 steps ~5-10 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference:small")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ce-weight", type=float, default=1.0, help="self mode: weight of the final layer's CE")
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="the EMA-teacher row's decay (the default's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from transformers import Trainer

    from hfcompress import DistillationConfig, DistillationTrainer
    from hfcompress.core.data import BlockDataset, load_blocks
    from hfcompress.distillation.modes import truncate
    from hfcompress.models.evaluate import kl_to_reference, perplexity
    from hfcompress.models.loading import load_model, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    full = load_model(path).eval()
    train = load_blocks("stdlib", tokenizer, args.block_size, split="train", num_blocks=args.steps * args.batch_size,
                        seed=args.seed)
    held_out = load_blocks("stdlib", tokenizer, args.block_size, split="test", num_blocks=args.eval_blocks,
                           seed=args.seed)

    def training(out, **extra):
        return DistillationConfig(output_dir=out, report_to=[], use_cpu=not torch.cuda.is_available(),
                                  disable_tqdm=True, seed=args.seed, per_device_train_batch_size=args.batch_size,
                                  max_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.steps // 20,
                                  lr_scheduler_type="cosine", save_strategy="no", logging_steps=args.steps, **extra)

    models = {"full": full, "truncate": truncate(full, args.layers)}
    with tempfile.TemporaryDirectory() as work:
        plain = truncate(full, args.layers)
        Trainer(model=plain, args=training(work + "/ce"), train_dataset=BlockDataset(train)).train()
        models["truncate+ce"] = plain.eval()
        taught = copy.deepcopy(full)
        DistillationTrainer(model=taught, train_dataset=BlockDataset(train), args=training(
            work + "/self", mode="self", exit_layers=[args.layers - 1], kd_weight=1.0,
            ce_weight=args.ce_weight)).train()
        models["self"] = truncate(taught, args.layers).eval()
        models["self (full model after)"] = taught.eval()
        averaged = copy.deepcopy(full)
        DistillationTrainer(model=averaged, train_dataset=BlockDataset(train), args=training(
            work + "/ema", mode="self", self_teacher="ema", ema_decay=args.ema_decay, exit_layers=[args.layers - 1],
            kd_weight=1.0, ce_weight=args.ce_weight)).train()
        models["self (EMA teacher)"] = truncate(averaged, args.layers).eval()
    rows = [{"model": name, "layers": m.config.num_hidden_layers, "perplexity": perplexity(m, held_out),
             "kl_to_full": kl_to_reference(m, full, held_out)} for name, m in models.items()]
    print(f"\n{args.model} -> {args.layers} layers, {args.steps} steps x {args.batch_size} x {args.block_size} tokens\n")
    print("| model | layers | perplexity | KL to full (nats/token) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['layers']} | {row['perplexity']:.3f} | {row['kl_to_full']:.4f} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
