#!/usr/bin/env python
"""At an equal byte budget, which wins: the teacher quantized harder, or a distilled student quantized less?

    python scripts/bench/equal_byte_bench.py --teacher reference:small --depths 2 1 --steps 150 \
        --work scripts/bench/work/equal_byte --out scripts/bench/results/equal_byte.json

Rows (each measured in its own process by ``ours.py``, on the same held-out blocks):

* the teacher in fp32 and quantized: int8 per-channel RTN, then GPTQ at int4, int3 and int2 (group
  ``--group-size``);
* per student depth in ``--depths``: a student with that many decoder layers (``make_student``: the teacher's
  layers at uniform spacing, the teacher's width and vocabulary), distilled from the teacher with the
  ``DistillationConfig`` defaults for ``--steps`` steps of ``--batch-size`` blocks, then fp32, int8 RTN and int4
  GPTQ;
* with ``--control``: the teacher trained further with cross-entropy on the same blocks for the same steps (the
  students see ``steps x batch`` blocks the teacher never saw; a teacher that was not trained to convergence
  gains from them too), then the teacher's ladder. The budget table counts it as a teacher row.

Bytes: the decoder layers' weights as stored in the checkpoint (packed integers, scales, norms), read from the
safetensors headers. The token embeddings and the LM head (kept in floating point, as quantization's default
``ignore=["lm_head"]``) have the same size in every row, because every student keeps the teacher's width and
vocabulary; they are reported apart (``shared_bytes``) and the checkpoint total is in the table too.

Writes ``--out`` (JSON), and beside it ``equal_byte.md`` (the table) and ``equal_byte.png`` (the plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402

DECODER_PREFIX = "model.layers."


def stored_bytes(folder: Path) -> dict:
    """Bytes of the decoder layers' tensors and of everything else, from a checkpoint's safetensors headers."""
    import struct

    decoder = other = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            if name.startswith(DECODER_PREFIX):
                decoder += size
            else:
                other += size
    return {"decoder_bytes": decoder, "shared_bytes": other}


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The teacher folder and the shared blocks file (calibration, train, eval)."""
    from transformers import AutoTokenizer

    from hfcompress.core.data import load_blocks
    from hfcompress.models.loading import resolve_model

    teacher = Path(resolve_model(args.teacher))
    path = work / f"blocks-{teacher.name}-{args.block_size}.safetensors"
    if not path.is_file():
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        T = args.block_size
        common.save_blocks(
            path, calibration=load_blocks("stdlib", tokenizer, T, split="train", num_blocks=64, seed=0),
            eval=load_blocks("stdlib", tokenizer, T, split="test", num_blocks=args.eval_blocks, seed=0),
            train=load_blocks("stdlib", tokenizer, T, split="train", num_blocks=args.steps * args.batch_size, seed=1))
    return teacher, path


def student_init(teacher: Path, depth: int, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress import make_student

    folder = work / f"student-{depth}L-init"
    if not (folder / "config.json").is_file():
        model = make_student(AutoModelForCausalLM.from_pretrained(teacher), num_layers=depth)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return folder


def budgets(rows: list[dict], slack: float = 1.05) -> list[dict]:
    """For each quantized student row: the best teacher row whose decoder bytes fit in the student's (x
    ``slack``), and the smallest teacher row that does not fit (what one more step of bytes buys)."""
    teachers = sorted((r for r in rows if r["role"] == "teacher" and r.get("perplexity")),
                      key=lambda r: r["decoder_bytes"])
    out = []
    for student in rows:
        if student["role"] != "student" or student["bits"] == 32 or not student.get("perplexity"):
            continue
        limit = slack * student["decoder_bytes"]
        fitting = [t for t in teachers if t["decoder_bytes"] <= limit]
        below = min(fitting, key=lambda t: t["perplexity"]) if fitting else None
        larger = [t for t in teachers if t["decoder_bytes"] > limit]
        above = min((t for t in larger if t["decoder_bytes"] == larger[0]["decoder_bytes"]),
                    key=lambda t: t["perplexity"]) if larger else None
        entry = {"budget_bytes": student["decoder_bytes"], "student": student["label"],
                 "student_perplexity": student["perplexity"]}
        for side, row in (("within", below), ("above", above)):
            entry[f"teacher_{side}"] = row and {k: row[k] for k in ("label", "decoder_bytes", "perplexity")}
        if below is None:
            entry["winner"] = "only the student fits"
        else:
            entry["winner"] = "student" if student["perplexity"] < below["perplexity"] else "teacher"
        out.append(entry)
    return out


def table(result: dict) -> str:
    kib = 1024
    m = result["machine"]
    lines = [f"# Equal bytes: the teacher quantized harder vs a distilled student quantized less ({result['date']})",
             "", f"`{result['command']}`", "",
             f"Teacher `{result['teacher']}` ({result['teacher_name']}). Each student: the teacher's layers at uniform "
             f"spacing, distilled with the `DistillationConfig` defaults (1.0 forward KL + 0.5 CE + 10 cosine hidden) "
             f"for {result['steps']} steps of {result['batch_size']} x {result['block_size']} tokens "
             f"({result['distill_tokens_per_student']:,} tokens; the teacher itself was trained on "
             f"{result.get('teacher_train_tokens') or '?':,} tokens), learning rate 1e-3 constant. GPTQ: group "
             f"{result['group_size']}, 64 calibration blocks. Perplexity on {result['eval_tokens']:,} held-out tokens "
             f"(stdlib test split). Machine: {m.get('cpu_model')} ({m.get('cpu_flags')}), {m.get('cpu_count')} vCPUs "
             f"shared with other jobs, {m.get('nproc')} core for this run, torch threads {m.get('torch_threads')}.",
             "", "Bytes: decoder layers as stored in the checkpoint (packed integers, scales, norms); the embeddings "
             "and LM head (floating point) are the same size in every row and included only in the checkpoint "
             "column.", "",
             "| model | bits | decoder weights KiB | checkpoint KiB | perplexity |", "|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: -r.get("decoder_bytes", 0)):
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else r.get("error", "—")
        lines.append(f"| {r['label']} | {r['bits']} | {r['decoder_bytes'] / kib:.0f} | "
                     f"{r['checkpoint_bytes'] / kib:.0f} | {ppl} |")
    lines += ["", f"Equal budget: each quantized student against the best teacher row whose decoder bytes fit in "
                  f"the student's (+5%), and the smallest teacher row that does not fit.", "",
              "| budget (decoder KiB) | distilled student | ppl | best teacher within budget (KiB, ppl) | "
              "next larger teacher (KiB, ppl) | winner at equal bytes |", "|---|---|---|---|---|---|"]

    def cell(row):
        return "—" if row is None else f"{row['label']} ({row['decoder_bytes'] / kib:.0f}, {row['perplexity']:.2f})"

    for b in result["budgets"]:
        lines.append(f"| {b['budget_bytes'] / kib:.0f} | {b['student']} | {b['student_perplexity']:.2f} | "
                     f"{cell(b['teacher_within'])} | {cell(b['teacher_above'])} | {b['winner']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r.get("perplexity"):
            groups.setdefault(r["model"], []).append(r)
    for (name, rows), marker in zip(sorted(groups.items()), "osD^v"):
        rows = sorted(rows, key=lambda r: r["decoder_bytes"])
        ax.plot([r["decoder_bytes"] / 1024 for r in rows], [r["perplexity"] for r in rows], marker=marker,
                label=name)
        for r in rows:
            ax.annotate(r["scheme"], (r["decoder_bytes"] / 1024, r["perplexity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("decoder weights as stored (KiB, log scale; embeddings + LM head identical in every row)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Equal bytes: teacher quantized harder vs distilled student ({result['teacher_name']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="reference:small")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 1], help="student decoder layers")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=common.WORK_DIR / "equal_byte")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "equal_byte.json")
    parser.add_argument("--control", action="store_true",
                        help="also the teacher trained further with cross-entropy on the students' blocks")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the measurements already in --work (only for a --work of the same arguments)")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    teacher, blocks_file = prepare(args, work)
    blocks = ["--blocks", blocks_file]
    g = args.group_size
    result = {"teacher": args.teacher, "teacher_name": teacher.name, "steps": args.steps,
              "batch_size": args.batch_size, "block_size": args.block_size, "group_size": g,
              "distill_tokens_per_student": args.steps * args.batch_size * args.block_size,
              "eval_tokens": args.eval_blocks * args.block_size, "machine": common.machine_info(), "rows": [],
              "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "command": " ".join(["python scripts/bench/equal_byte_bench.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "teacher_train_tokens": json.loads((teacher / "reference_metrics.json").read_text()).get("train_tokens")
              if (teacher / "reference_metrics.json").is_file() else None}

    def save() -> None:
        result["budgets"] = budgets(result["rows"])
        common.write_json(args.out, result)
        args.out.with_suffix(".md").write_text(table(result))
        plot(result, args.out.with_suffix(".png"))

    def measure(model_name: str, folder: Path, role: str, scheme: str, bits: int, quant_args: list) -> None:
        label = f"{model_name} {scheme}"
        tag = label.replace(" ", "_")
        ckpt = None if bits == 32 else work / f"ckpt-{tag}"
        method = quant_args[0] if quant_args else "fp32"
        out = work / f"{tag}.json"
        done = args.reuse and out.is_file() and json.loads(out.read_text()).get("status") == "ok"
        r = json.loads(out.read_text()) if done else common.run_ours(
            ["quant", "--model", folder, *blocks, "--method", method, *quant_args[1:],
             *(["--save", ckpt] if ckpt else [])], out, work / f"{tag}.log")
        row = {"label": label, "model": model_name, "role": role, "scheme": scheme, "bits": bits,
               "status": r.get("status"), "error": r.get("error"), "perplexity": r.get("perplexity")}
        stored = ckpt or folder
        row.update(stored_bytes(stored), checkpoint_bytes=common.checkpoint_bytes(stored))
        result["rows"].append(row)
        print(f"{label}: ppl={row['perplexity']} decoder={row['decoder_bytes']} B", flush=True)
        save()

    def ladder(model_name: str, folder: Path, role: str, teacher_side: bool) -> None:
        measure(model_name, folder, role, "fp32", 32, [])
        measure(model_name, folder, role, "int8 RTN", 8, ["rtn", "--bits", 8, "--group-size", 0])
        for bits in (4, 3, 2) if teacher_side else (4,):
            measure(model_name, folder, role, f"int{bits} GPTQ g{g}", bits, ["gptq", "--bits", bits,
                                                                              "--group-size", g])

    ladder(f"teacher ({result['teacher_name']})", teacher, "teacher", teacher_side=True)
    result["distill"] = {}

    def train(name: str, init: Path, objective: str) -> Path | None:
        """``init`` trained for --steps on the train blocks (distilled from the teacher, or CE only)."""
        trained = work / f"{name}-trained"
        out = work / f"train-{name}.json"
        done = args.reuse and out.is_file() and json.loads(out.read_text()).get("status") == "ok"
        record = json.loads(out.read_text()) if done else common.run_ours(
            ["distill", "--teacher", teacher, "--student", init, *blocks, "--objective", objective, "--steps",
             args.steps, "--batch-size", args.batch_size, "--save", trained], out, work / f"train-{name}.log")
        result["distill"][name] = {k: record.get(k) for k in ("status", "error", "objective", "train_seconds",
                                                              "perplexity", "final_train_loss")}
        if record.get("status") != "ok":
            print(f"training {name} failed: {record.get('error')}", flush=True)
            return None
        return trained

    for depth in args.depths:
        distilled = train(f"student-{depth}L", student_init(teacher, depth, work), "default")
        if distilled is not None:
            ladder(f"distilled student {depth}L", distilled, "student", teacher_side=False)
    if args.control:
        further = train("teacher-ce", teacher, "ce")
        if further is not None:
            ladder("teacher + CE on the same blocks", further, "teacher", teacher_side=True)
    save()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
