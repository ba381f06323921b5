#!/usr/bin/env python
"""Do GPTQ's defaults hold on a real model? One GPTQ setting changed at a time against the library defaults.

    python scripts/bench/defaults_sweep.py --model scripts/bench/work/models/smollm2-fp32 \
        --blocks scripts/bench/work/smollm2/blocks-smollm2.safetensors --work scripts/bench/work/sweep-smollm2 \
        [--variants default no-act-order damp-0.1 ...] [--bits 4 --group-size 128]

Every variant is one ``ours.py quant --method gptq`` subprocess (run.py's ``Runner``: alone, logged, its exact
error kept) scored on the same held-out ``eval`` blocks of ``--blocks``, with perplexity and KL to the fp32
model. Calibration variants get their own blocks file: the same ``eval`` blocks, calibration drawn by run.py's
``text_blocks`` (same seed, so the first 64 blocks of a 128-block draw are the 64 of the profile's file).
Writes ``sweep.json`` and ``sweep.md`` in ``--work`` after every variant; ``--resume`` reuses the variants
whose JSON is already there with the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

# name -> (what changes, extra ours.py arguments, calibration (source, blocks, tokens per block) or None for the
# profile's blocks file). The library defaults: act_order with static groups, damp 0.01.
VARIANTS = {
    "default": ("library defaults (act_order, static groups, damp 0.01); profile calibration", [], None),
    "no-act-order": ("act_order=False (static groups)", ["--no-act-order"], None),
    "no-act-order-dynamic": ("act_order=False, static_groups=False (the original GPTQ)",
                             ["--no-act-order", "--no-static-groups"], None),
    "damp-0.1": ("damp=0.1", ["--damp", "0.1"], None),
    "damp-0.001": ("damp=0.001", ["--damp", "0.001"], None),
    "calib-32": ("calibration: the first 32 of the profile's blocks", ["--num-calibration", "32"], None),
    "calib-mix-128": ("calibration: 128 mix blocks × 512 (the profile's 64 and 64 more)", [], ("mix", 128, 512)),
    "calib-mix-128x256": ("calibration: 128 mix blocks × 256 tokens (QuantizationConfig's num_samples/seq_len)",
                          [], ("mix", 128, 256)),
    "calib-stdlib": ("calibration source: stdlib (code only), same count and length", [], ("stdlib", None, None)),
    "calib-pydoc": ("calibration source: pydoc (English only; the eval text's own train split)", [],
                    ("pydoc", None, None)),
}


def calibration_file(spec: tuple, base: dict, tokenizer_dir: Path, folder: Path) -> Path:
    """A blocks file with the profile's ``eval`` blocks and calibration drawn from ``spec``."""
    source, count, length = spec
    count = count or int(base["calibration"].shape[0])
    length = length or int(base["calibration"].shape[1])
    path = folder / f"blocks-{source}-{count}x{length}.safetensors"
    if not path.is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        calibration = run.text_blocks(tokenizer, source, "train", count, 0, length)
        if calibration.shape[0] < count:
            raise SystemExit(f"the {source} train split holds only {calibration.shape[0]} blocks of {length} tokens")
        common.save_blocks(path, calibration=calibration, eval=base["eval"])
    return path


def markdown(rows: list[dict], fp32_ppl: float | None, rtn: dict | None, default: dict | None = None) -> str:
    """The sweep's table; ``default``: the library-defaults row when the sweep did not measure one itself
    (run.py's GPTQ row of the same bits and group: the same command)."""
    measured = next((r for r in rows if r["name"] == "default" and r.get("status") == "ok"), None)
    if measured is None and default is not None:
        default = dict(default, name="default", what="library defaults (run.py's row, same command)")
        rows = [default, *rows]
    default = measured or default
    lines = []
    for r in rows:
        ok = r.get("status") == "ok"
        kl, ppl = r.get("kl_to_fp32"), r.get("perplexity")
        lines.append([r["name"], r["what"], report._f(ppl) if ok else f"error: {r.get('error')}",
                      report._pct(report._delta(ppl, fp32_ppl)) if ok and fp32_ppl else "-",
                      report._mnats(kl) if ok else "-",
                      report._ratio(kl, default.get("kl_to_fp32"), 3) if ok and default and kl is not None else "-",
                      report._ratio(kl, rtn.get("kl_to_fp32"), 3) if ok and rtn and kl is not None else "-",
                      str(r.get("num_calibration_blocks", "-"))])
    return report.table(["variant", "what changes", "perplexity", "Δ vs fp32", "KL mnats/tok", "KL vs default",
                         "KL vs RTN", "calibration blocks"], lines)


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
    fp32_ppl, rtn, default_row = None, None, None
    if args.reference and args.reference.is_file():
        named = {r["name"]: r for r in json.loads(args.reference.read_text()).get("quant", [])}
        fp32_ppl = (named.get("fp32") or {}).get("perplexity")
        tag = f"int{args.bits}-g{args.group_size}" if args.group_size else f"int{args.bits}-channel"
        rtn, gptq = named.get(f"rtn-{tag}"), named.get(f"gptq-{tag}")
        if gptq and gptq.get("status") == "ok":
            default_row = gptq

    def write() -> None:
        common.write_json(work / "sweep.json", results)
        text = markdown(results["quant"], fp32_ppl, rtn, default_row)
        (work / "sweep.md").write_text(f"`{results['command']}`\n\n{text}\n")

    runner = run.Runner(work, results, None, after_job=write, previous=previous)
    for name in args.variants:
        what, extra, spec = VARIANTS[name]
        blocks = calibration_file(spec, base, args.model, work) if spec else args.blocks
        out = work / "json" / f"{name}.json"
        runner.run(run.Job("quant", name, "ours",
                           [str(BENCH_DIR / "ours.py"), "quant", "--model", args.model, "--blocks", blocks,
                            "--method", "gptq", "--bits", args.bits, "--group-size", args.group_size, *extra,
                            "--kl", "--out", out], out, args.timeout, dict(what=what)))
    write()
    print((work / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
