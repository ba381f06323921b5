"""Streaming quantization of a checkpoint larger than memory (issue #20): time and peak RSS.

Subcommands (each measured step runs in its own process, so its VmHWM is its own peak):

    make      write a random-initialised Llama checkpoint shard by shard (one tensor alive at a time; one
              shard per decoder layer), fp32, plus random calibration/eval token blocks
    quantize  hfcompress.quantize_checkpoint on it (rtn or gptq), recording wall time and peak RSS (VmHWM)
    peer      llm-compressor's oneshot on it (scripts/bench/peers/llmcompressor_oneshot.py in the peer venv)
    report    collect the JSON results into results/stream_bench.md/.json

Random model, random token ids: a randomly initialised model has no tokenizer worth the name, and its quality
numbers mean nothing; only time, memory and correctness of the output (it loads and verifies) are measured.

    python scripts/bench/stream_bench.py make --out work/stream/llama-2L --layers 2
    python scripts/bench/stream_bench.py quantize --model work/stream/llama-2L --method rtn \\
        --save work/stream/out --result results/stream/rtn-2L.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _blocks(model: str) -> Path:
    """The token blocks live beside the model folder (a stray .safetensors inside it is refused as a stale shard)."""
    return Path(model).parent / f"{Path(model).name}.blocks.safetensors"


def _gib(n) -> float:
    return round(n / 2 ** 30, 3)


# ---------------------------------------------------------------------------------------------------------
# make
# ---------------------------------------------------------------------------------------------------------
def make(args) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).mul_(0.02)

    shards: list[list[tuple[str, callable]]] = [[("model.embed_tokens.weight", lambda: randn(args.vocab, args.hidden))]]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shards.append([
            (p + "self_attn.q_proj.weight", lambda: randn(args.hidden, args.hidden)),
            (p + "self_attn.k_proj.weight", lambda: randn(kv, args.hidden)),
            (p + "self_attn.v_proj.weight", lambda: randn(kv, args.hidden)),
            (p + "self_attn.o_proj.weight", lambda: randn(args.hidden, args.hidden)),
            (p + "mlp.gate_proj.weight", lambda: randn(args.inter, args.hidden)),
            (p + "mlp.up_proj.weight", lambda: randn(args.inter, args.hidden)),
            (p + "mlp.down_proj.weight", lambda: randn(args.hidden, args.inter)),
            (p + "input_layernorm.weight", lambda: torch.ones(args.hidden)),
            (p + "post_attention_layernorm.weight", lambda: torch.ones(args.hidden)),
        ])
    shards.append([("model.norm.weight", lambda: torch.ones(args.hidden)),
                   ("lm_head.weight", lambda: randn(args.vocab, args.hidden))])
    weight_map, total = {}, 0
    started = time.perf_counter()
    for index, entries in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: make_tensor() for key, make_tensor in entries}  # one shard (<= one layer) alive
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    blocks = {"calibration": torch.randint(0, args.vocab, (args.num_samples, args.seq_len), generator=generator),
              "eval": torch.randint(0, args.vocab, (2, args.seq_len), generator=generator)}
    save_file(blocks, str(out.parent / f"{out.name}.blocks.safetensors"))
    if args.tokenizer:  # llm-compressor's script loads one from the model folder (ids are random anyway)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(args.tokenizer) / file, out / file)
    meta = {"bytes": total, "gib": _gib(total), "layers": args.layers, "hidden": args.hidden, "inter": args.inter,
            "vocab": args.vocab, "seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": _gib(_vmhwm())}
    (out / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


# ---------------------------------------------------------------------------------------------------------
# quantize (ours)
# ---------------------------------------------------------------------------------------------------------
def quantize(args) -> None:
    import torch

    import hfcompress
    from hfcompress.quantization.config import QuantizationConfig

    torch.set_num_threads(args.threads)
    meta = json.loads((Path(args.model) / "bench_meta.json").read_text())
    result = {"tool": "hfcompress.quantize_checkpoint", "method": args.method, "model_gib": meta["gib"],
              "layers": meta["layers"], "max_memory": args.max_memory, "threads": args.threads,
              "command": " ".join([Path(sys.executable).name] + sys.argv), "status": "running"}
    try:
        from safetensors.torch import load_file

        blocks = load_file(str(_blocks(args.model)))["calibration"][: args.num_samples]
        config = QuantizationConfig(method=args.method, bits=4, group_size=128, num_samples=blocks.shape[0],
                                    seq_len=blocks.shape[1])
        if Path(args.save).exists():
            shutil.rmtree(args.save)
        started = time.perf_counter()
        hfcompress.quantize_checkpoint(args.model, args.save, config,
                                       calibration_data=blocks if args.method != "rtn" else None,
                                       max_memory=args.max_memory, progress=True)
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["calibration"] = None if args.method == "rtn" else list(blocks.shape)
        result["output_gib"] = _gib(sum(p.stat().st_size for p in Path(args.save).glob("*.safetensors")))
        from hfcompress.quantization.verify import verify_checkpoint

        report = verify_checkpoint(args.save, deep=False)
        result["verify_ok"] = report.ok
        result["status"] = "ok"
    except Exception as exc:  # recorded, as the other bench tools do
        result.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    result["peak_rss_gib"] = _gib(_vmhwm())
    result["peak_rss_fraction_of_checkpoint"] = round(result["peak_rss_gib"] / meta["gib"], 4)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if args.delete_output and Path(args.save).exists():
        shutil.rmtree(args.save)


# ---------------------------------------------------------------------------------------------------------
# peer: llm-compressor
# ---------------------------------------------------------------------------------------------------------
def peer(args) -> None:
    python = HERE / ".venv-peers" / "bin" / "python"
    meta = json.loads((Path(args.model) / "bench_meta.json").read_text())
    out = Path(args.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(python), str(HERE / "peers" / "llmcompressor_oneshot.py"), "--model", args.model,
               "--blocks", str(_blocks(args.model)), "--method", args.method, "--bits", "4",
               "--group-size", "128", "--num-calibration", str(args.num_samples), "--no-eval",
               "--patch-pin-memory", "--out", str(out)]
    if args.save:
        command += ["--save", args.save]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    code = subprocess.run(command, env=env).returncode
    data = json.loads(out.read_text()) if out.is_file() else {"status": "error", "error": f"exit code {code}"}
    data.update(model_gib=meta["gib"], layers=meta["layers"], process_seconds=round(time.perf_counter() - started, 1),
                command=" ".join(command))
    if "peak_rss_bytes" in data:
        data["peak_rss_gib"] = _gib(data["peak_rss_bytes"])
        data["peak_rss_fraction_of_checkpoint"] = round(data["peak_rss_gib"] / meta["gib"], 4)
    out.write_text(json.dumps(data, indent=2))
    print(json.dumps({k: v for k, v in data.items() if k != "traceback"}))
    if args.save and Path(args.save).exists():
        shutil.rmtree(args.save)


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def report(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*.json"))]
    flags = ""
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
        avx = sorted({f for f in cpu.split() if f.startswith("avx512")})
        flags = f"{model}; {os.cpu_count()} cores visible; AVX-512: {', '.join(avx) or 'none'}"
    except OSError:
        pass
    import psutil

    machine = f"{flags}; {psutil.virtual_memory().total / 2 ** 30:.1f} GiB RAM; {platform.platform()}"
    lines = ["| tool | method | checkpoint (fp32) | layers | max_memory | calibration | wall s | peak RSS | "
             "peak RSS / checkpoint | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calib = r.get("calibration") or (f"{r.get('num_calibration_blocks')} blocks" if r.get("num_calibration_blocks")
                                         else "-")
        seconds = r.get("seconds") or r.get("quantize_seconds")
        lines.append(f"| {r.get('tool')} | {r.get('method')} | {r.get('model_gib')} GiB | {r.get('layers')} | "
                     f"{r.get('max_memory') or '-'} | {calib} | {seconds if seconds is None else round(seconds, 1)} | "
                     f"{r.get('peak_rss_gib')} GiB | {r.get('peak_rss_fraction_of_checkpoint')} | "
                     f"{r.get('status')}{': ' + r['error'] if r.get('error') else ''} |")
    table = "\n".join(lines)
    Path(args.md).write_text(args.header.replace("{machine}", machine).replace("{date}", time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime())).replace("{table}", table) if args.header else table + "\n")
    Path(args.json or Path(args.md).with_suffix(".json")).write_text(
        json.dumps({"machine": machine, "runs": rows}, indent=2))
    print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied (for the peer)")
    p.set_defaults(func=make)
    p = sub.add_parser("quantize")
    p.add_argument("--model", required=True)
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--max-memory", default=None)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--delete-output", action="store_true")
    p.set_defaults(func=quantize)
    p = sub.add_parser("peer")
    p.add_argument("--model", required=True)
    p.add_argument("--method", choices=["rtn", "gptq"], required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--save", default=None)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=peer)
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", default=None, help="default: --md with .json")
    p.add_argument("--header", default=None)
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
