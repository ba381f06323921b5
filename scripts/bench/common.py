"""Helpers shared by the benchmark driver, our side and the peer scripts.

This module is imported from **two** environments: the project's (hfcompress, transformers 5.x) and the peer
venv (llm-compressor & co., an older transformers). It therefore imports only the standard library, torch and
safetensors, and must never import hfcompress.

Every number that two tools are compared on is computed here, by the same code, in both environments:
perplexity, weight bytes, checkpoint bytes, peak RSS, generation speed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------------------------------------
# The shared token blocks: written once from our side, read by every tool
# --------------------------------------------------------------------------------------------------------
def save_blocks(path: str | os.PathLike, **blocks: torch.Tensor) -> Path:
    """Write named (N, T) int64 token-block tensors (``calibration``, ``eval``, ``train``) to safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.to(torch.int64).contiguous() for name, t in blocks.items()}, str(path))
    return path


def load_blocks_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------
def model_device(model) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL) over every token but the first of each (N, T) block — non-overlapping windows.

    The same definition as ``hfcompress.models.evaluate.perplexity``, re-stated here so the peer venv (which has no
    hfcompress) scores models with byte-for-byte the same procedure.
    """
    model.eval()
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        predicted = logits[:, :-1].float()  # position t predicts token t+1
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def kl_and_perplexity(reference, model, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, float]:
    """(mean KL(reference ‖ model) of the next-token distributions in nats per predicted token, the model's
    perplexity) over the positions ``perplexity`` scores, from one forward pass of each model: the perplexity
    is ``perplexity(model, blocks)``'s, same batches and sums. Shared by both environments so every row's KL is
    computed the same way."""
    reference.eval()
    model.eval()
    total_kl, total_nll, count = 0.0, 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size]  # (B, T)
        logits = model(input_ids=batch.to(model_device(model))).logits[:, :-1].float()  # (B, T-1, V)
        targets = batch[:, 1:].to(logits.device)
        total_nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum").item()
        ref_logits = reference(input_ids=batch.to(model_device(reference))).logits[:, :-1].float()
        for row in range(batch.shape[0]):  # one sequence at a time: (T-1, V) temporaries, not (B, T-1, V) ones
            q = torch.log_softmax(logits[row], dim=-1)
            p = torch.log_softmax(ref_logits[row].to(q.device), dim=-1)
            total_kl += (p.exp() * (p - q)).sum().item()
        count += targets.numel()
    return total_kl / count, math.exp(total_nll / count)


def score_against_fp32(model, fp32_path, blocks: torch.Tensor, kl: bool) -> dict:
    """``{"perplexity"}``, plus ``"kl_to_fp32"`` when ``kl``: the float32 model at ``fp32_path`` is loaded only
    then (after the caller's peak RSS was taken) and freed after the one pass of :func:`kl_and_perplexity`."""
    if not kl:
        return {"perplexity": perplexity(model, blocks)}
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(fp32_path, dtype=torch.float32)
    kl_value, ppl = kl_and_perplexity(fp32, model, blocks)
    return {"kl_to_fp32": kl_value, "perplexity": ppl}


@torch.no_grad()
def mean_pooled_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           batch_size: int = 16) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: masked mean of the
    last hidden state, then L2-normalised -> (N, H) float32."""
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].to(device)  # (B, T)
        mask = attention_mask[start:start + batch_size].to(device)  # (B, T)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, H)
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, H)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Cosine similarity of each row of ``candidate`` to the same row of ``reference`` (both (N, H))."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)  # (N,)
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
            "mean_cosine_loss_pct": 100 * (1 - cos.mean().item())}


# --------------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------------
def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors that actually hold a (possibly subclassed, quantized) tensor's data.

    torchao's and optimum-quanto's quantized weights are tensor subclasses whose ``numel()*element_size()``
    reports the *logical* fp size; their real storage is the inner tensors named by ``__tensor_flatten__``.
    """
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner: list[torch.Tensor] = []
    for name in names:
        value = getattr(t, name)
        if isinstance(value, torch.Tensor):
            inner.extend(_inner_tensors(value))
    return inner


def weight_bytes(model) -> int:
    """Bytes of parameters, persistent buffers and quantization metadata held in memory, shared storage once.

    Counts the real storage of tensor subclasses (torchao, quanto), bitsandbytes' packed ``Params4bit`` plus
    its ``quant_state`` (absmax, code), and HQQ's ``meta`` dict (scales/zeros kept outside parameters).
    """
    seen: set[tuple[int, int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        for inner in _inner_tensors(t):
            if inner.device.type == "meta":
                continue
            key = (inner.untyped_storage().data_ptr(), inner.storage_offset(), inner.numel())
            if key in seen:
                continue
            seen.add(key)
            total += inner.numel() * inner.element_size()

    for module in model.modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for _, param in module.named_parameters(recurse=False):
            add(param)
            state = getattr(param, "quant_state", None)
            if state is not None:  # bitsandbytes 4-bit: absmax (+ nested absmax/code) live here
                for value in vars(state).values():
                    add(value) if isinstance(value, torch.Tensor) else None
                    if hasattr(value, "absmax"):  # nested (double-quant) state
                        for nested in vars(value).values():
                            add(nested) if isinstance(nested, torch.Tensor) else None
            scb = getattr(param, "SCB", None)  # bitsandbytes int8 row scales
            add(scb)
        for name, buf in module.named_buffers(recurse=False):
            if name not in non_persistent:
                add(buf)
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict):  # HQQLinear keeps scale/zero in a dict
            for value in meta.values():
                add(value) if isinstance(value, torch.Tensor) else None
    return total


def float_linear_layers(model, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names of ``nn.Linear`` layers whose weight is still a plain floating-point tensor (not quantized).

    A tool that silently skips layers (e.g. a group size that does not divide the width) shows up here.
    """
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and not name.endswith(skip) and \
                type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype.is_floating_point:
            names.append(name)
    return names


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of weight files in a checkpoint folder (all shards), excluding tokenizer and config files."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


# --------------------------------------------------------------------------------------------------------
# Memory and time
# --------------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. Each tool runs in its own process, so this is its peak.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's own address space. Not
    ``getrusage().ru_maxrss``: across fork + exec Linux carries the *parent's* high-water mark into the child's
    ``ru_maxrss``, so every subprocess of a big driver would report at least the driver's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def summarize(values: list[float]) -> dict:
    """Median and spread of repeated measurements. ``spread_pct`` = (max - min) / median."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread_pct": 100 * (max(values) - min(values)) / med if med else 0.0}


def repeat_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def generation_speed(model, prompt: torch.Tensor, new_tokens: int = 128, repeats: int = 3,
                     pad_token_id: int | None = None) -> dict:
    """Prefill and decode tokens/s at batch 1, greedy, with median and spread over ``repeats``.

    Prefill: one forward over ``prompt`` (1, P). Decode: (time of generating ``new_tokens`` - time of
    generating 1) / (new_tokens - 1), so the prompt's prefill is not counted in the decode rate — the same
    definition as ``hfcompress.models.evaluate.measure_speed``. Each repeat pairs a 1-token and an N-token run so
    that load drift from other processes hits both halves of the difference alike.
    """
    model.eval()
    device = model_device(model)
    prompt = prompt.to(device)
    attention = torch.ones_like(prompt)
    kwargs = dict(attention_mask=attention, do_sample=False, pad_token_id=pad_token_id)

    def generate(n: int) -> None:
        model.generate(input_ids=prompt, max_new_tokens=n, eos_token_id=None, **kwargs)

    model(input_ids=prompt)
    generate(2)  # warm-up: allocations, kernel selection, KV-cache setup
    prefill = repeat_seconds(lambda: model(input_ids=prompt), repeats, warmup=0)
    decode_rates = []
    for _ in range(repeats):
        one = repeat_seconds(lambda: generate(1), 1, warmup=0)[0]
        full = repeat_seconds(lambda: generate(new_tokens), 1, warmup=0)[0]
        decode_rates.append((new_tokens - 1) / max(full - one, 1e-9))
    prefill_rates = [prompt.shape[1] / s for s in prefill]
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "prefill_tokens_per_s": summarize(prefill_rates), "decode_tokens_per_s": summarize(decode_rates)}


def memory_bandwidth_gbps(size_mib: int = 512, repeats: int = 5) -> dict:
    """Sustained read bandwidth of this machine as torch sees it: a large fp32 sum (read-only traffic)."""
    x = torch.ones(size_mib * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    times = repeat_seconds(lambda: x.sum(), repeats, warmup=1)
    rates = [x.numel() * 4 / t / 1e9 for t in times]
    return {"read_gb_per_s": summarize(rates), "buffer_mib": size_mib, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------------
# Results and environment
# --------------------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def error_line(exc: BaseException) -> str:
    """The exception as one line: type and the first line of its message (what RESULTS.md shows)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def package_versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info() -> dict:
    """CPU model, core count, memory, OS and torch threading, from /proc and nproc."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
        info["cpu_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                                     if f in flags)
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        info["nproc"] = os.cpu_count()
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total_kib = int(next(ln for ln in meminfo if ln.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["cpu_count"] = os.cpu_count()  # nproc honours OMP_NUM_THREADS; this does not
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    info["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def seed_everything(seed: int = 0) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def distill_inputs(args) -> tuple:
    """What both sides of the distillation comparison train on, loaded the same way: the first
    ``steps * batch_size`` training blocks (each seen once), the teacher's tokenizer, the teacher and the shared
    student initialisation in float32 (and all the blocks, for the held-out perplexity). ``args`` has ``blocks``,
    ``steps``, ``batch_size``, ``teacher``, ``student``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed_everything(0)
    blocks = load_blocks_file(args.blocks)
    train = blocks["train"][: args.steps * args.batch_size]  # (steps*B, T): each block seen once
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    return blocks, train, tokenizer, teacher, student


def timed_training(result: dict, trainer, timer, steps: int, tokens_per_step: int, eval_blocks) -> None:
    """``trainer.train()`` (with ``timer = step_timer()`` among its callbacks), recorded the same way for every
    trainer: memory before and at peak, wall and steady-state throughput, final loss, held-out perplexity."""
    result["baseline_rss_bytes"] = current_rss_bytes()
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    result["peak_rss_bytes"] = peak_rss_bytes()
    tokens = steps * tokens_per_step
    result.update(steady_throughput(timer.times, tokens_per_step))
    result.update(train_seconds=seconds, train_tokens=tokens, wall_tokens_per_s=tokens / seconds,
                  train_runtime_reported=output.metrics.get("train_runtime"), final_train_loss=output.training_loss)
    result["perplexity"] = perplexity(trainer.model, eval_blocks)


def run_json_child(command: list[str], what: str, timeout: float) -> dict:
    """Run a measurement in a fresh process (its own peak RSS) and return the JSON of its last stdout line."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_and_record(out: str | os.PathLike, fields: dict, body: Callable[[dict], None]) -> int:
    """Run ``body(result)`` and write ``result`` (starting from ``fields``) to ``out`` as JSON.

    A failure is recorded, not raised: ``status`` becomes ``"error"`` with the one-line ``error`` that
    RESULTS.md lists and the traceback's tail, so one broken tool never hides the others' numbers.
    Returns the process exit code (0 ok, 1 error).
    """
    import traceback

    result = dict(fields, status="running")
    try:
        body(result)
        result["status"] = "ok"
        code = 0
    except Exception as exc:  # record any tool failure verbatim; that is the point of this wrapper
        result.update(status="error", error=error_line(exc),
                      traceback="".join(traceback.format_exception(exc)[-6:]))
        code = 1
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    write_json(out, result)
    return code


def run_ours(argv: list, out: Path, log: Path) -> dict:
    """One ``ours.py`` measurement in its own process; its JSON, or an error record naming the failure."""
    out.unlink(missing_ok=True)
    with open(log, "w") as handle:
        subprocess.run([sys.executable, str(BENCH_DIR / "ours.py"), *map(str, argv), "--out", str(out)],
                       stdout=handle, stderr=subprocess.STDOUT, check=False)
    if out.is_file():
        return json.loads(out.read_text())
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {"status": "error", "error": lines[-1] if lines else "no output"}


def step_timer():
    """A ``transformers.TrainerCallback`` that records the wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.times:
                self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return StepTimer()


def steady_throughput(times: list[float], tokens_per_step: int, warmup_steps: int = 2) -> dict:
    """Tokens/s over the steps after ``warmup_steps`` (first steps pay allocation/dispatch warm-up), with the
    median and spread of the per-step rates."""
    durations = [b - a for a, b in zip(times, times[1:])][warmup_steps:]
    if not durations:
        durations = [b - a for a, b in zip(times, times[1:])]
    rates = [tokens_per_step / d for d in durations]
    return {"tokens_per_s": tokens_per_step * len(durations) / sum(durations),
            "per_step_tokens_per_s": summarize(rates), "measured_steps": len(durations),
            "warmup_steps_excluded": warmup_steps if len(durations) < len(times) - 1 else 0}
