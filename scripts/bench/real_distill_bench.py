#!/usr/bin/env python
"""Distillation on a real model folder: a half-depth student trained with KD (live teacher and teacher cache)
against cross-entropy only, at equal steps on the same token blocks in the same order.

    python scripts/bench/real_distill_bench.py --model scripts/bench/work/models/smollm2-fp32 \\
        --blocks scripts/bench/work/smollm2/blocks-smollm2.safetensors --steps 40 --batch-size 1 --kd-lr 1e-3 \\
        --runs ce:1e-3 live-h cache ce:3e-3 live ce:3e-4 --timing-reps 3 --quantize-kd --out real_distill.json

``--blocks``: the token blocks ``run.py`` prepares for a real model (``train`` blocks are trained on, ``eval``
blocks scored — for SmolLM2 the pydoc test split, so rows compare with the post-training quantization rows,
``calibration`` blocks calibrate the optional GPTQ of the KD student). The student is ``make_student(teacher,
num_layers=half, layer_selection=--layers)`` (default: every other teacher layer from the first), re-made from
seed 0 for every run.

Runs (``--runs``, in the order given, so live and cache runs can be interleaved in one time window; ``KIND:LR``
sets the learning rate, else ``--kd-lr``):

* ``ce:LR``: cross-entropy only at learning rate LR (the baseline is the best of these on the eval blocks);
* ``live``: ``kd_weight``·T²·forward KL(teacher ‖ student) + ``ce_weight``·CE with the teacher running beside
  the student (logits only, so the live and cache runs optimise the same objective);
* ``live-h``: ``live`` plus ``--hidden-weight`` × the hidden-state loss (student layer i -> the last teacher layer
  of the group it stands for, DistillationConfig's ``uniform`` layer map): needs the live teacher's hidden states;
* ``cache``: the ``live`` objective from a top-k teacher cache (``write_teacher_cache`` over the same train blocks,
  written once first; its build time is reported apart: it is paid once per data set, not per run). Every KD run
  also records the cache's approximation error for its student (full KL vs the k+1-bucket KL).

``--quantize-kd``: afterwards the best KD student is quantized to int4 by each of ``--quant-methods`` (its own
copy each) and scored: perplexity, KL to the teacher and to the unquantized student (distill, then quantize).

Tokens/s = training tokens / ``train_runtime`` of the Trainer (steps only; model loading and scoring excluded).
Results are written to ``--out`` after every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch


def _config(work: Path, name: str, args, learning_rate: float, **objective):
    from hfcompress import DistillationConfig

    return DistillationConfig(output_dir=str(work / name), report_to=[], use_cpu=not torch.cuda.is_available(),
                              disable_tqdm=True, seed=0, per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=learning_rate, warmup_steps=max(1, args.steps // 20),
                              lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=max(1, args.steps // 10),
                              save_strategy="no", train_sampling_strategy="sequential", **objective)


def student_layers(teacher, args) -> list[int] | str:
    """``--layers``: 'uniform' (make_student's default), 'keep-last' (every other layer, but the teacher's last
    in place of the last kept one) or explicit comma-separated teacher layer indices."""
    from hfcompress.distillation.hidden import num_layers
    from hfcompress.distillation.student import LAYER_SELECTIONS

    count = args.student_layers or max(1, num_layers(teacher) // 2)
    if args.layers in LAYER_SELECTIONS:
        return LAYER_SELECTIONS[args.layers](num_layers(teacher), count)
    return [int(i) for i in args.layers.split(",")]


def training_blocks(train: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """The ``count`` (N, T) blocks a run trains on, in order: seed 0 the file's first ones; seed > 0 a seeded draw
    (and order) from all of them, for the spread between data draws."""
    if seed:
        train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))]
    return train[:count]


def _kd_objective(args, hidden: bool) -> dict:
    return dict(loss="forward_kl", temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
                hidden_weight=args.hidden_weight if hidden else 0.0, hidden_loss=args.hidden_loss)


def _train(kind: str, learning_rate: float, teacher, tokenizer, train, cache_dir, args, work):
    from hfcompress import DistillationTrainer, make_student
    from hfcompress.core.data import BlockDataset

    torch.manual_seed(0)
    selection = student_layers(teacher, args)
    student = make_student(teacher, num_layers=len(selection), layer_selection=selection)
    name = f"{kind}-{learning_rate:g}"
    if kind == "ce":
        config = _config(work, name, args, learning_rate, kd_weight=0.0, ce_weight=1.0, hidden_weight=0.0)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=BlockDataset(train), processing_class=tokenizer)
    elif kind in ("live", "live-h"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_config(
                                      work, name, args, learning_rate, **_kd_objective(args, kind == "live-h")),
                                      train_dataset=BlockDataset(train), processing_class=tokenizer)
    else:
        trainer = DistillationTrainer(model=student, args=_config(work, name, args, learning_rate, mode="cache",
                                                                  cache_top_k=args.top_k,
                                                                  **_kd_objective(args, False)),
                                      teacher_cache=cache_dir, processing_class=tokenizer)
    output = trainer.train()
    logs = [{k: v for k, v in entry.items() if k in ("step", "loss", "kd_loss", "ce_loss", "hidden_loss")}
            for entry in trainer.state.log_history if "loss" in entry]
    runtime = output.metrics["train_runtime"]
    return student.eval(), {"run": name, "kind": kind, "learning_rate": learning_rate, "train_runtime_s": runtime,
                            "student_layers": selection, "train_tokens": int(train.numel()),
                            "tokens_per_s": train.numel() / runtime, "train_log": logs}


def _interleaved_timing(teacher, tokenizer, train, cache_dir, args, work, reps: int) -> dict:
    """Seconds of one training step's loss forward + backward (optimizer step excluded: the same in both modes)
    with the live teacher and from the cache, alternating live/cache ``reps`` times on the same batch, so both
    see the same load of a shared machine; medians and their ratio."""
    import statistics

    from transformers import default_data_collator

    from hfcompress import DistillationTrainer, make_student
    from hfcompress.core.data import BlockDataset
    from hfcompress.distillation.cache import CacheDataset, TeacherCache
    from hfcompress.distillation.hidden import num_layers

    selection = student_layers(teacher, args)
    kd = _kd_objective(args, False)
    trainers = {
        "live": DistillationTrainer(model=make_student(teacher, num_layers=len(selection), layer_selection=selection),
                                    teacher_model=teacher,
                                    args=_config(work, "timing-live", args, args.kd_lr, **kd),
                                    train_dataset=BlockDataset(train), processing_class=tokenizer),
        "cache": DistillationTrainer(model=make_student(teacher, num_layers=len(selection), layer_selection=selection),
                                     args=_config(work, "timing-cache", args, args.kd_lr, mode="cache", **kd),
                                     teacher_cache=cache_dir, processing_class=tokenizer)}
    dataset = {"live": BlockDataset(train), "cache": CacheDataset(TeacherCache(cache_dir))}
    batch = {name: default_data_collator([dataset[name][i] for i in range(args.batch_size)]) for name in trainers}
    seconds = {name: [] for name in trainers}
    for _ in range(reps + 1):  # the first round warms up (allocations, the head check) and is dropped
        for name, trainer in trainers.items():
            model = trainer.model.train()
            started = time.perf_counter()
            loss = trainer.compute_loss(model, dict(batch[name]))
            loss.backward()
            seconds[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    tokens = args.batch_size * train.shape[1]
    return {"reps": reps, "batch_tokens": tokens, "seconds": seconds, "median_seconds": medians,
            "tokens_per_s": {name: tokens / value for name, value in medians.items()},
            "cache_speedup": medians["live"] / medians["cache"]}


def distill_then_quantize(student, row: dict, teacher, calibration: torch.Tensor, held_out: torch.Tensor,
                          args) -> dict:
    """The KD student quantized to int4 (``--quant-methods``, group ``--quant-group-size``, ``lm_head`` kept):
    perplexity and KL to the teacher on the eval blocks, beside the unquantized student's. Each method
    quantizes its own copy; GPTQ is calibrated on the file's calibration blocks (the first
    ``--calibration-blocks``)."""
    import copy

    from hfcompress import QuantizationConfig, quantize
    from hfcompress.models.evaluate import kl_to_reference, perplexity

    calibration = calibration[: args.calibration_blocks]
    result = {"student": row["run"], "bits": 4, "group_size": args.quant_group_size,
              "calibration_tokens": int(calibration.numel()), "student_perplexity": row["perplexity"],
              "student_kl_to_teacher": kl_to_reference(student, teacher, held_out, batch_size=4), "rows": []}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    for method in args.quant_methods:
        quantized = copy.deepcopy(student)
        config = QuantizationConfig(method=method, bits=4, group_size=args.quant_group_size,
                                    seq_len=int(calibration.shape[1]), num_samples=int(calibration.shape[0]))
        started = time.perf_counter()
        quantize(quantized, config, calibration_data=calibration if config.needs_calibration else None,
                 progress=False)
        seconds = time.perf_counter() - started
        entry = {"method": f"{method} int4 g{args.quant_group_size}", "quantize_seconds": seconds,
                 "perplexity": perplexity(quantized, held_out, batch_size=4),
                 "kl_to_teacher": kl_to_reference(quantized, teacher, held_out, batch_size=4),
                 "kl_to_student": kl_to_reference(quantized, student, held_out, batch_size=4)}
        result["rows"].append(entry)
        print(json.dumps(entry), flush=True)
        del quantized
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="teacher model folder")
    parser.add_argument("--blocks", type=Path, required=True, help="safetensors of calibration/eval/train blocks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--student-layers", type=int, default=None, help="default: half the teacher's")
    parser.add_argument("--runs", nargs="*", default=["cache", "ce:3e-4", "live", "ce:1e-3", "ce:1e-4"],
                        help="'ce:LR', 'live', 'live-h' (live + hidden-state loss) or 'cache' (KD at --kd-lr, or "
                             "'KIND:LR'), in the order to run")
    parser.add_argument("--kd-lr", type=float, default=3e-4)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=10.0,
                        help="'live-h' runs: weight of the hidden-state loss (student layer i -> the teacher layer "
                             "the group it stands for ends with, DistillationConfig's 'uniform' layer map)")
    parser.add_argument("--hidden-loss", default="cosine")
    parser.add_argument("--layers", default="uniform",
                        help="student layers: 'uniform', 'keep-last' or comma-separated teacher layer indices")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="0: the file's first steps x batch train blocks in order; N > 0: a seeded random draw "
                             "of them from all the file's train blocks (for seed-to-seed spread)")
    parser.add_argument("--eval-blocks", type=int, default=None,
                        help="score on the first N eval blocks only (quick exploration; default: all)")
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=64, help="teacher cache: stored tokens per position")
    parser.add_argument("--logprob-format", default="uint7", help="teacher cache: storage of the log-probabilities")
    parser.add_argument("--id-coding", default="ranked-rice", help="teacher cache: storage of the ids")
    parser.add_argument("--cache-sampling", default="top-k", choices=["top-k", "sample"],
                        help="teacher cache: the top-k ids + tail, or --top-k draws per position (ids and counts)")
    parser.add_argument("--tail-draws", type=int, default=0,
                        help="teacher cache: draws per position outside the top-k (unbiased tail, cache format 3)")
    parser.add_argument("--timing-reps", type=int, default=0,
                        help="after the runs: time one step's loss forward+backward live vs cache, alternating this "
                             "many times on the same batch (the training runs' own tokens/s are from different "
                             "time windows of a shared machine)")
    parser.add_argument("--approximation-blocks", type=int, default=2,
                        help="KD runs, when the cache exists: its approximation error for the trained student on this "
                             "many train blocks")
    parser.add_argument("--quantize-kd", action="store_true",
                        help="after the runs: the best KD student quantized to int4 (distill, then quantize)")
    parser.add_argument("--quant-methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--quant-group-size", type=int, default=64,
                        help="64 divides SmolLM2's 576-wide projections (128 would fall back to 64 there)")
    parser.add_argument("--calibration-blocks", type=int, default=16, help="GPTQ: calibration blocks used")
    parser.add_argument("--work", type=Path, default=Path("scripts/bench/work/real_distill"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from safetensors.torch import load_file

    from hfcompress.distillation.cache import write_teacher_cache
    from hfcompress.models.evaluate import perplexity
    from hfcompress.models.loading import load_model, load_tokenizer

    blocks = load_file(str(args.blocks))
    held_out = blocks["eval"][: args.eval_blocks]
    if blocks["train"].shape[0] < args.steps * args.batch_size:
        raise SystemExit(f"{args.blocks} holds {blocks['train'].shape[0]} train blocks; steps x batch size = "
                         f"{args.steps * args.batch_size} are needed")
    train = training_blocks(blocks["train"], args.steps * args.batch_size, args.train_seed)
    tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.model).eval()
    out = {"command": "python scripts/bench/real_distill_bench.py " + " ".join(argv or __import__("sys").argv[1:]),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "steps": args.steps, "batch_size": args.batch_size, "train_seed": args.train_seed,
           "block_size": int(train.shape[1]),
           "train_tokens": int(train.numel()), "eval_tokens": int(held_out.shape[0] * (held_out.shape[1] - 1)),
           "kd_objective": f"{args.kd_weight} forward KL (T={args.temperature:g}) + {args.ce_weight} CE, logits only; "
                           f"'live-h' adds {args.hidden_weight:g} x {args.hidden_loss} hidden-state loss",
           "student_layers": student_layers(teacher, args),
           "teacher_perplexity": perplexity(teacher, held_out, batch_size=4) if args.runs else None, "runs": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"teacher ppl {out['teacher_perplexity']}", flush=True)
    stored = "top" if args.cache_sampling == "top-k" else "sample"
    cache_dir = args.work / (f"cache-{stored}{args.top_k}-{args.logprob_format}-{args.id_coding}-"
                             f"T{args.temperature:g}-{train.shape[0]}x{train.shape[1]}"
                             + (f"-seed{args.train_seed}" if args.train_seed else "")
                             + (f"-tail{args.tail_draws}" if args.tail_draws else ""))
    if any(spec.partition(":")[0] == "cache" for spec in args.runs) or args.timing_reps:
        build_seconds = None  # None: an earlier run's cache of the same settings and blocks, reused
        if not (cache_dir / "cache.json").is_file():
            started = time.perf_counter()
            write_teacher_cache(teacher, train, cache_dir, top_k=args.top_k, tokenizer=tokenizer,
                                temperature=args.temperature, teacher_name=str(args.model),
                                batch_size=args.batch_size, progress=False, logprob_format=args.logprob_format,
                                id_coding=args.id_coding, sampling=args.cache_sampling, tail_draws=args.tail_draws)
            build_seconds = time.perf_counter() - started
        from hfcompress.distillation.cache import TeacherCache

        meta = TeacherCache(cache_dir).meta  # recorded whether written now or reused
        out["cache"] = {"build_seconds": build_seconds, "top_k": meta.top_k, "tail_draws": meta.tail_draws,
                        "sampling": meta.sampling, "id_coding": meta.id_coding,
                        "logprob_format": meta.logprob_format,
                        "bytes_per_token": meta.bytes_per_token, "mean_tail_mass": meta.mean_tail_mass,
                        "mean_distinct": meta.mean_distinct, "quantization_kl": meta.quantization_kl}
        print(f"cache {out['cache']}", flush=True)
        save()
    best_kd = None
    for spec in args.runs:
        kind, _, lr = spec.partition(":")
        if kind not in ("ce", "live", "live-h", "cache"):
            raise SystemExit(f"--runs: {spec!r} is not 'ce:LR', 'live[:LR]', 'live-h[:LR]' or 'cache[:LR]'")
        learning_rate = float(lr) if lr else args.kd_lr
        student, row = _train(kind, learning_rate, teacher, tokenizer, train, cache_dir, args, args.work)
        row["perplexity"] = perplexity(student, held_out, batch_size=4)
        if kind != "ce" and (cache_dir / "cache.json").is_file():
            # What the top-k cache leaves out, for this student: its full forward KL to the teacher vs the k+1-bucket
            # KL the cache loss sees, per predicted token on the first train blocks.
            from hfcompress.distillation.cache import TeacherCache, approximation_error

            row["cache_approximation"] = approximation_error(TeacherCache(cache_dir), teacher, student,
                                                             num_blocks=args.approximation_blocks)
        out["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "train_log"}), flush=True)
        save()
        if kind != "ce" and (best_kd is None or row["perplexity"] < best_kd[1]["perplexity"]):
            best_kd = (student, row)
        else:
            del student
    if args.timing_reps:
        out["interleaved_timing"] = _interleaved_timing(teacher, tokenizer, train, cache_dir, args, args.work,
                                                        args.timing_reps)
        print(json.dumps(out["interleaved_timing"]), flush=True)
        save()
    if args.quantize_kd and best_kd is not None:
        student, row = best_kd
        out["distill_then_quantize"] = distill_then_quantize(student, row, teacher, blocks["calibration"], held_out,
                                                             args)
        save()
    ce_runs = [r for r in out["runs"] if r["kind"] == "ce"]
    if ce_runs:
        base = min(ce_runs, key=lambda r: r["perplexity"])
        out["baseline"] = base["run"]
        for r in out["runs"]:
            r["ratio_vs_best_ce"] = r["perplexity"] / base["perplexity"]
    save()
    print("| run | lr | perplexity | vs best CE | tokens/s |\n|---|---:|---:|---:|---:|")
    for r in out["runs"]:
        ratio = f"{r['ratio_vs_best_ce']:.3f}" if "ratio_vs_best_ce" in r else "-"
        print(f"| {r['kind']} | {r['learning_rate']:g} | {r['perplexity']:.3f} | {ratio} | {r['tokens_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
