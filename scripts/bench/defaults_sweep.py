#!/usr/bin/env python
"""Do the quantization defaults hold on a real model? One setting changed at a time against the library defaults.

    python scripts/bench/defaults_sweep.py --model scripts/bench/work/models/smollm2-fp32 \
        --blocks scripts/bench/work/smollm2/blocks-smollm2.safetensors --work scripts/bench/work/sweep-smollm2 \
        [--variants default no-act-order damp-0.1 awq-grid-10 g32 ...] [--bits 4 --group-size 128]

Every variant is one ``ours.py quant`` subprocess (run.py's ``Runner``: alone, logged, its exact error kept)
scored on the same held-out ``eval`` blocks of ``--blocks``, with perplexity and KL to the fp32 model. GPTQ
variants change one GPTQ setting, ``awq-*`` one AWQ setting (against AWQ's defaults: ``awq-default``), ``g*`` /
``channel`` GPTQ's group size (a size/quality trade-off: the table gives the weight bytes beside the KL).
Calibration variants get their own blocks file: the same ``eval`` blocks, calibration drawn by run.py's
``text_blocks`` (same seed, so the first 64 blocks of a 128-block draw are the 64 of the profile's file).
Writes ``sweep.json`` and ``sweep.md`` in ``--work`` after every variant; ``--resume`` reuses the variants
whose JSON is already there with the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


@dataclass(frozen=True)
class Variant:
    what: str  # what changes against the method's defaults
    method: str = "gptq"
    args: tuple = ()  # extra ours.py arguments (after the common ones: a later --group-size wins)
    # (source, blocks, tokens per block[, draw seed]); None: the profile's blocks file
    calibration: tuple | None = None


# The library defaults: GPTQ act_order with static groups, damp 0.01; AWQ a 20-point scale grid, the block-error
# search on 8,192 tokens, the clipping search, symmetric. ``fp32`` / ``rtn`` are the reference rows (taken from
# --reference when it has them).
VARIANTS = {
    "fp32": Variant("the fp32 model", "fp32"),
    "rtn": Variant("round-to-nearest (the KL vs RTN column's reference)", "rtn"),
    "default": Variant("library defaults (act_order, static groups, damp 0.01); profile calibration"),
    "no-act-order": Variant("act_order=False (static groups)", args=("--no-act-order",)),
    "no-act-order-dynamic": Variant("act_order=False, static_groups=False (the original GPTQ)",
                                    args=("--no-act-order", "--no-static-groups")),
    "damp-0.1": Variant("damp=0.1", args=("--damp", "0.1")),
    "damp-0.001": Variant("damp=0.001", args=("--damp", "0.001")),
    "calib-32": Variant("calibration: the first 32 of the profile's blocks", args=("--num-calibration", "32")),
    "calib-mix-128": Variant("calibration: 128 mix blocks × 512 (the profile's 64 and 64 more)",
                             calibration=("mix", 128, 512)),
    "calib-mix-128x256": Variant("calibration: 128 mix blocks × 256 tokens (QuantizationConfig's num_samples/seq_len)",
                                 calibration=("mix", 128, 256)),
    "calib-stdlib": Variant("calibration source: stdlib (code only), same count and length",
                            calibration=("stdlib", None, None)),
    "calib-pydoc": Variant("calibration source: pydoc (English only; the eval text's own train split)",
                           calibration=("pydoc", None, None)),
    # GPTQ's group size: smaller groups cost scale bytes (a 32-bit scale per group) for less error.
    "g32": Variant("GPTQ group size 32", args=("--group-size", "32")),
    "g64": Variant("GPTQ group size 64", args=("--group-size", "64")),
    "channel": Variant("GPTQ per output channel (no groups)", args=("--group-size", "0")),
    "rtn-g64": Variant("RTN group size 64 (the group-size rows' data-free anchor)", "rtn", ("--group-size", "64")),
    "rtn-g32": Variant("RTN group size 32 (the group-size rows' data-free anchor)", "rtn", ("--group-size", "32")),
    "g32-no-act-order": Variant("GPTQ group size 32, act_order=False (static groups)", args=(
        "--group-size", "32", "--no-act-order")),
    # AWQ, one setting at a time against its defaults.
    "awq-default": Variant("AWQ library defaults (grid 20, block search on 8,192 tokens, clipping, symmetric)",
                           "awq"),
    "awq-grid-10": Variant("AWQ scale grid 10 (alpha step 0.1)", "awq", ("--awq-grid", "10")),
    "awq-grid-40": Variant("AWQ scale grid 40 (alpha step 0.025)", "awq", ("--awq-grid", "40")),
    "awq-search-4096": Variant("AWQ block search on 4,096 calibration tokens", "awq",
                               ("--awq-search-tokens", "4096")),
    "awq-search-16384": Variant("AWQ block search on 16,384 calibration tokens", "awq",
                                ("--awq-search-tokens", "16384")),
    "awq-no-clip": Variant("AWQ without the clipping search (min-max scales after the fold)", "awq",
                           ("--awq-no-clip",)),
    # Noise: the defaults on another calibration draw (64 mix blocks × 512, seed 1 instead of the file's seed 0).
    "draw-1": Variant("GPTQ defaults, another calibration draw (mix, seed 1)", calibration=("mix", 64, 512, 1)),
    "awq-draw-1": Variant("AWQ defaults, another calibration draw (mix, seed 1)", "awq",
                          calibration=("mix", 64, 512, 1)),
    # The reference teachers' calibration source is stdlib: there ours.py --seed redraws it (seed 1).
    "seed-1": Variant("GPTQ defaults, another stdlib calibration draw (ours.py --seed 1)", args=("--seed", "1")),
    "awq-seed-1": Variant("AWQ defaults, another stdlib calibration draw (ours.py --seed 1)", "awq",
                          ("--seed", "1")),
    "awq-asymmetric": Variant("AWQ with zero points (symmetric=False; AutoAWQ's zero_point=True)", "awq",
                              ("--asymmetric",)),
}
DEFAULTS = {"gptq": "default", "awq": "awq-default"}  # the row each method's variants are compared with


def calibration_file(spec: tuple, base: dict, tokenizer_dir: Path, folder: Path) -> Path:
    """A blocks file with the profile's ``eval`` blocks and calibration drawn from ``spec``."""
    source, count, length, seed = (*spec, 0)[:4]
    count = count or int(base["calibration"].shape[0])
    length = length or int(base["calibration"].shape[1])
    path = folder / f"blocks-{source}-{count}x{length}{f'-seed{seed}' if seed else ''}.safetensors"
    if not path.is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        calibration = run.text_blocks(tokenizer, source, "train", count, seed, length)
        if calibration.shape[0] < count:
            raise SystemExit(f"the {source} train split holds only {calibration.shape[0]} blocks of {length} tokens")
        common.save_blocks(path, calibration=calibration, eval=base["eval"])
    return path


def markdown(rows: list[dict], fp32_ppl: float | None, rtn: dict | None, defaults: dict | None = None) -> str:
    """The sweep's table; ``defaults``: {variant name: run.py's row of the same command} for the reference and
    method-default rows the sweep did not measure itself (fp32, RTN, GPTQ's and AWQ's rows of the same bits and
    group)."""
    measured = {r["name"]: r for r in rows if r.get("status") == "ok"}
    borrowed = [dict(row, name=name, what=VARIANTS[name].what + " (run.py's row, same command)")
                for name, row in (defaults or {}).items() if name not in measured and row]
    rows = borrowed + rows
    by_name = {r["name"]: r for r in rows if r.get("status") == "ok"}
    default_bytes = (by_name.get("default") or {}).get("weight_bytes")
    lines = []
    for r in rows:
        ok = r.get("status") == "ok"
        kl, ppl = r.get("kl_to_fp32"), r.get("perplexity")
        variant = VARIANTS.get(r["name"])
        default = by_name.get(DEFAULTS[variant.method]) if variant and variant.method in DEFAULTS else None
        weight_bytes = r.get("weight_bytes")
        lines.append([r["name"], r["what"], report._f(ppl) if ok else f"error: {r.get('error')}",
                      report._pct(report._delta(ppl, fp32_ppl)) if ok and fp32_ppl else "-",
                      report._mnats(kl) if ok else "-",
                      report._ratio(kl, default.get("kl_to_fp32"), 3) if ok and default and kl is not None else "-",
                      report._ratio(kl, rtn.get("kl_to_fp32"), 3) if ok and rtn and kl is not None else "-",
                      report._f(weight_bytes) if weight_bytes else "-",
                      report._ratio(weight_bytes, default_bytes, 3) if weight_bytes and default_bytes else "-",
                      str(r.get("num_calibration_blocks", "-"))])
    return report.table(["variant", "what changes", "perplexity", "Δ vs fp32", "KL mnats/tok",
                         "KL vs method default", "KL vs RTN", "weight bytes", "bytes vs GPTQ default",
                         "calibration blocks"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp32 model folder (with its tokenizer)")
    parser.add_argument("--blocks", type=Path, required=True, help="the profile's blocks (calibration, eval)")
    parser.add_argument("--work", type=Path, required=True, help="folder for blocks, logs, JSON and sweep.md")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reference", type=Path, default=None,
                        help="results.json of a run.py run on the same model and blocks: its fp32 and RTN rows "
                             "(same bits and group) give the Δ vs fp32 and KL vs RTN columns")
    parser.add_argument("--resume", action="store_true", help="reuse variants already measured with the same command")
    parser.add_argument("--timeout", type=int, default=7200)
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = common.load_blocks_file(args.blocks)
    previous = {}
    if args.resume and (work / "sweep.json").is_file():
        previous = {r["name"]: r for r in json.loads((work / "sweep.json").read_text())["quant"]
                    if r.get("status") == "ok"}
    results: dict = {"command": "python scripts/bench/defaults_sweep.py " + " ".join(argv or sys.argv[1:]),
                     "machine": common.machine_info()}
    reference: dict = {}  # run.py's rows of the same commands: fp32, RTN and the methods' defaults
    if args.reference and args.reference.is_file():
        named = {r["name"]: r for r in json.loads(args.reference.read_text()).get("quant", [])
                 if r.get("status") == "ok"}
        tag = f"int{args.bits}-g{args.group_size}" if args.group_size else f"int{args.bits}-channel"
        reference = {"fp32": named.get("fp32"), "rtn": named.get(f"rtn-{tag}"),
                     "default": named.get(f"gptq-{tag}"), "awq-default": named.get(f"awq-{tag}"),
                     "channel": named.get(f"gptq-int{args.bits}-channel") if args.group_size else None}

    def write() -> None:
        common.write_json(work / "sweep.json", results)
        measured = {r["name"]: r for r in results["quant"] if r.get("status") == "ok"}
        fp32 = measured.get("fp32") or reference.get("fp32") or {}
        rtn = measured.get("rtn") or reference.get("rtn")
        text = markdown(results["quant"], fp32.get("perplexity"), rtn, reference)
        (work / "sweep.md").write_text(f"`{results['command']}`\n\n{text}\n")

    runner = run.Runner(work, results, None, after_job=write, previous=previous)
    for name in args.variants:
        variant = VARIANTS[name]
        blocks = calibration_file(variant.calibration, base, args.model, work) if variant.calibration else args.blocks
        out = work / "json" / f"{name}.json"
        runner.run(run.Job("quant", name, "ours",
                           [str(BENCH_DIR / "ours.py"), "quant", "--model", args.model, "--blocks", blocks,
                            "--method", variant.method, "--bits", args.bits, "--group-size", args.group_size,
                            *variant.args, "--kl", "--out", out], out, args.timeout, dict(what=variant.what)))
    write()
    print((work / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
