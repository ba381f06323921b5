"""TRL peer: logit distillation with TRL's ``GKDTrainer`` in its off-policy setting, for tokens/s and memory.

Runs in the peer venv. The installed TRL's top-level ``DistillationTrainer`` is on-policy only (it generates
completions from prompts), so the comparable trainer is ``trl.experimental.gkd.GKDTrainer`` with
``lmbda=0`` (never generate: train on the dataset's tokens), ``seq_kd=False`` and ``beta=0`` (its generalized
JSD is then forward KL(teacher ‖ student), at temperature 1) — the same objective as hfcompress's
``DistillationConfig(loss="forward_kl", temperature=1, kd_weight=1, ce_weight=0)``.

Teacher, student initialisation (a folder written by run.py), token blocks, batch, steps, learning rate,
optimizer and precision (fp32, no gradient checkpointing) are the same as our side's.

    .venv-peers/bin/python peers/trl_distill.py --teacher DIR --student DIR --blocks blocks.safetensors \
        --steps 100 --batch-size 8 --out result.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


def collate(features: list[dict]) -> dict:
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, help="student initialisation folder (same for both sides)")
    parser.add_argument("--blocks", required=True, help="safetensors with 'train' and 'eval' blocks")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (TrainingArguments.bf16)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    fields = {"tool": "trl", "trainer": "GKDTrainer(lmbda=0, beta=0, seq_kd=False)", "steps": args.steps,
              "batch_size": args.batch_size, "learning_rate": args.learning_rate, "bf16": args.bf16,
              "versions": common.package_versions(["trl", "transformers", "torch", "accelerate"])}

    def body(result: dict) -> None:
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        blocks, train, tokenizer, teacher, student = common.distill_inputs(args)
        dataset = Dataset.from_dict({"input_ids": train.tolist()})
        with tempfile.TemporaryDirectory() as output_dir:
            config = GKDConfig(
                output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=int(train.shape[1]),
                gradient_checkpointing=False, bf16=args.bf16, fp16=False, logging_steps=max(1, args.steps // 5),
                save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_drop_last=True,
                use_cpu=True, disable_dropout=True,
            )
            timer = common.step_timer()
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, data_collator=collate, callbacks=[timer])
            common.timed_training(result, trainer, timer, args.steps, args.batch_size * int(train.shape[1]),
                                  blocks["eval"])

    return common.run_and_record(args.out, fields, body)


if __name__ == "__main__":
    sys.exit(main())
