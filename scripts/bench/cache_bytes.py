#!/usr/bin/env python
"""Bytes per predicted token of the teacher cache's storage formats, side by side on one teacher and one data set.

    python scripts/bench/cache_bytes.py --model scripts/bench/work/models/smollm2-fp32 \
        --blocks scripts/bench/work/smollm2/blocks-smollm2.safetensors --num-blocks 40 --top-k 64 \
        --out scripts/bench/work/cache_bytes.json

Writes one cache per (id coding, log-prob format) of the first ``--num-blocks`` ``train`` blocks of ``--blocks`` into
``--work`` and prints each format's bytes per token, the arrays that make them up, and the storage KL.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--blocks", type=Path, required=True, help="safetensors with a 'train' tensor of token blocks")
    parser.add_argument("--num-blocks", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--codings", nargs="+", default=["ranked-rice", "fixed"])
    parser.add_argument("--formats", nargs="+", default=["uint7", "uint6"])
    parser.add_argument("--work", type=Path, default=Path("scripts/bench/work/cache_bytes"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from hfcompress.distillation.cache import TeacherCache, write_teacher_cache
    from hfcompress.models.loading import load_model, load_tokenizer

    blocks = load_file(str(args.blocks))["train"][: args.num_blocks]
    teacher, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    results = {}
    for coding in args.codings:
        for fmt in args.formats:
            folder = args.work / f"{coding}-{fmt}"
            shutil.rmtree(folder, ignore_errors=True)
            with torch.no_grad():
                meta = write_teacher_cache(teacher, blocks, folder, top_k=args.top_k, tokenizer=tokenizer,
                                           teacher_name=args.model, logprob_format=fmt, id_coding=coding,
                                           progress=False, batch_size=4)
            shard = TeacherCache(folder).shards[0]
            parts = {name: array.nbytes / meta.tokens for name, array in shard.items() if name != "input_ids"}
            results[f"{coding}-{fmt}"] = {"bytes_per_token": meta.bytes_per_token, "tokens": meta.tokens,
                                          "quantization_kl": meta.quantization_kl, "parts": parts}
            print(f"{coding:12s} {fmt}: {meta.bytes_per_token:.1f} bytes/token, storage KL "
                  f"{meta.quantization_kl:.2e}; " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items())),
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
