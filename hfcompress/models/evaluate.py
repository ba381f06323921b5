"""Evaluation: held-out perplexity, size, speed and memory of a causal LM.

Perplexity uses **fixed-length, non-overlapping windows**: the held-out text is packed into consecutive
blocks of ``block_size`` tokens (see :func:`hfcompress.core.data.pack_blocks`), each block is scored on its own,
and every token but the first of each block is predicted (the first has no context). The result is
``exp(total NLL / number of predicted tokens)``. Non-overlapping windows give slightly higher perplexity
than a strided sliding window, but every token is scored exactly once and the cost is one forward per
block; ``stride`` < ``block_size`` switches to overlapping windows scored only on their new tokens.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.data import check_block_size, load_texts, pack_stream, token_stream, utf8_bytes
from ..core.devices import peak_memory_bytes, peak_rss_bytes, reset_peak_memory, synchronize
from ..core.errors import ConfigError, DataError


# --------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def negative_log_likelihood(model, blocks: torch.Tensor, batch_size: int = 8, score_from: int = 1,
                            progress: bool = False) -> tuple[float, int]:
    """Sum of NLL (nats) and number of scored tokens over ``blocks`` (N, T).

    Within each block, tokens at positions ``>= score_from`` are scored (``score_from >= 1``).
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise DataError("perplexity needs a non-empty (num_blocks, block_size) tensor of token ids")
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity", disable=not progress,
                      leave=False):
        batch = blocks[start:start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        predicted = logits[:, score_from - 1:-1].float()  # logits for positions score_from..T-1
        targets = batch[:, score_from:]
        nll = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]),
                                                targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    return total_nll, total_tokens


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean NLL) over every token but the first of each block (non-overlapping windows)."""
    was_training = model.training
    model.eval()
    try:
        nll, count = negative_log_likelihood(model, blocks, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def kl_to_reference(model, reference, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean ``KL(p_reference ‖ p_model)`` in nats per predicted token over ``blocks`` (N, T): how far a compressed
    model's next-token distributions are from the teacher's/original's, on every position but the last.

    Logits are compared on the vocabulary rows both models have (padded embedding rows are dropped).
    """
    model_device, reference_device = _model_device(model), _model_device(reference)
    total, count = 0.0, 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="KL", disable=not progress, leave=False):
        batch = blocks[start:start + batch_size]  # (B, T)
        ours = model(input_ids=batch.to(model_device)).logits[:, :-1].float()  # (B, T-1, V)
        theirs = reference(input_ids=batch.to(reference_device)).logits[:, :-1].float().to(ours.device)
        rows = min(ours.shape[-1], theirs.shape[-1])
        log_q = torch.log_softmax(ours[..., :rows], dim=-1)
        log_p = torch.log_softmax(theirs[..., :rows], dim=-1)
        total += torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True).item()
        count += log_q.shape[0] * log_q.shape[1]
    return total / count


def strided_windows(stream: torch.Tensor, block_size: int, stride: int) -> tuple[torch.Tensor, int]:
    """Overlapping windows of ``block_size`` advancing by ``stride`` -> ((N, T), first scored position).

    The first window is scored from position 1; later ones only on their last ``stride`` tokens, so every
    token after the first is scored exactly once with at least ``block_size - stride`` tokens of context.
    """
    if not 0 < stride <= block_size:
        raise DataError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    starts = list(range(0, stream.numel() - block_size + 1, stride))
    if not starts:
        raise DataError(f"the text has {stream.numel()} tokens, fewer than one window of {block_size}")
    return torch.stack([stream[s:s + block_size] for s in starts]), block_size - stride


# --------------------------------------------------------------------------------------------------------
# Size, speed, memory
# --------------------------------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes of parameters and persistent buffers held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    non_persistent = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n not in non_persistent]
    for _, tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def count_parameters(model) -> int:
    """Number of weights, counting each logical (unpacked) weight once, also for quantized modules."""
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_num_parameters", None)
        if callable(logical):
            total += logical()
            continue
        for _, param in module.named_parameters(recurse=False):
            # bitsandbytes 4-bit params pack two values per byte; their quant_state knows the real shape.
            shape = getattr(getattr(param, "quant_state", None), "shape", None)
            total += math.prod(shape) if shape is not None else param.numel()
    return total


def _median_seconds(fn, repeats: int, device: torch.device | None = None) -> tuple[float, float]:
    """Median and spread of ``fn``'s wall time; on a GPU each run ends when its queued kernels have finished."""
    device = device or torch.device("cpu")
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times))


@torch.no_grad()
def measure_speed(model, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s at batch 1, greedy.

    Prefill: one forward over ``prompt`` (1, P). Decode: ``generate`` with exactly ``new_tokens`` new tokens
    minus ``generate`` with one new token, divided by ``new_tokens - 1``, so the prompt's prefill is not
    counted in the decode rate. End-of-sequence tokens are ignored (``eos_token_id=None``, llama.cpp's
    ``ignore_eos``) rather than suppressed with ``min_new_tokens``, whose logits processor adds a scan of the whole
    vocabulary to every step (~0.5 ms on a 49k vocabulary on one core). Medians over ``repeats`` after one warm-up.
    """
    model.eval()
    device = _model_device(model)
    prompt = prompt.to(device)
    attention = torch.ones_like(prompt)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]

    def generate(n):
        model.generate(input_ids=prompt, attention_mask=attention, max_new_tokens=n, eos_token_id=None,
                       do_sample=False, pad_token_id=pad)

    model(input_ids=prompt)  # warm-up
    generate(2)
    prefill_s, prefill_spread = _median_seconds(lambda: model(input_ids=prompt), repeats, device)
    one_s, _ = _median_seconds(lambda: generate(1), repeats, device)
    full_s, full_spread = _median_seconds(lambda: generate(new_tokens), repeats, device)
    decode_s = max(full_s - one_s, 1e-9)
    return {
        "prefill_tokens": prompt.shape[1],
        "prefill_tokens_per_s": prompt.shape[1] / prefill_s,
        "decode_new_tokens": new_tokens,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "timing_repeats": repeats,
        "prefill_spread_s": prefill_spread,
        "decode_spread_s": full_spread,
    }


# --------------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What ``hfcompress eval`` reports. ``None`` means "not measured"."""

    model: str
    data: str
    block_size: int
    num_blocks: int
    scored_tokens: int
    perplexity: float
    bits_per_byte: float  # tokenizer-independent: mean bits per token x tokens per UTF-8 byte of the text
    num_parameters: int
    weight_bytes: int
    checkpoint_bytes: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_rss_bytes: int | None = None
    dtype: str | None = None
    device: str | None = None
    peak_gpu_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated over the evaluation
    kl_to_reference: float | None = None  # mean KL(reference ‖ model), nats/token (see evaluate's kl_reference)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        return format_table([self])


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return str(value)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def format_table(results: list[EvalResult]) -> str:
    """A plain-text table, one row per metric and one column per model."""
    rows = [
        ("perplexity", lambda r: _fmt(r.perplexity, 3)),
        ("bits per byte", lambda r: _fmt(r.bits_per_byte, 4)),
        ("scored tokens", lambda r: _fmt(r.scored_tokens)),
        ("parameters", lambda r: _fmt(r.num_parameters)),
        ("checkpoint on disk", lambda r: _human_bytes(r.checkpoint_bytes)),
        ("weights in memory", lambda r: _human_bytes(r.weight_bytes)),
        ("prefill tokens/s (batch 1)", lambda r: _fmt(r.prefill_tokens_per_s, 1)),
        ("decode tokens/s (batch 1)", lambda r: _fmt(r.decode_tokens_per_s, 1)),
        ("peak RSS", lambda r: _human_bytes(r.peak_rss_bytes)),
    ]
    if any(r.peak_gpu_memory_bytes is not None for r in results):
        rows.append(("peak GPU memory", lambda r: _human_bytes(r.peak_gpu_memory_bytes)))
    if any(r.kl_to_reference is not None for r in results):
        rows.insert(2, ("KL to reference (nats/token)", lambda r: _fmt(r.kl_to_reference, 4)))
    header = ["metric"] + [Path(r.model).name or r.model for r in results]
    body = [[name] + [get(r) for r in results] for name, get in rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(
    model,
    tokenizer=None,
    data="stdlib:test",
    block_size: int | None = None,
    num_blocks: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    speed: bool = True,
    new_tokens: int = 64,
    prompt_tokens: int = 64,
    seed: int = 0,
    model_name: str | None = None,
    data_label: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | None = None,
    device_map: str | dict | None = None,
    kl_reference=None,
) -> EvalResult:
    """Evaluate a loaded model (or a folder/Hub id, loaded with ``AutoModelForCausalLM``).

    ``data`` is any text source of :func:`hfcompress.core.data.load_texts`. ``num_blocks`` draws a seeded subset
    of the blocks (all by default). ``stride`` switches to overlapping windows. ``device`` / ``device_map`` say
    where to load ``model`` when it is a path (see :func:`~hfcompress.models.loading.load_model`); a model object
    is evaluated where it is. On a GPU, timings wait for the GPU's queued work (``torch.cuda.synchronize``) and
    ``peak_gpu_memory_bytes`` is ``torch.cuda.max_memory_allocated`` over the evaluation. ``kl_reference`` (a
    model or a folder/Hub id, e.g. the teacher) adds the mean KL from its next-token distributions to the model's
    on the same windows; it is loaded (on the same device) after the peak memory is read, so the memory figures
    stay the model's own.
    """
    from .loading import checkpoint_bytes, load_model, load_tokenizer, resolve_model

    for name, value in (("batch_size", batch_size), ("new_tokens", new_tokens), ("num_blocks", num_blocks)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"evaluate: {name} must be a positive integer, got {value!r}")
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        resolved = resolve_model(name)
        checkpoint_dir = checkpoint_dir or (resolved if os.path.isdir(resolved) else None)
        tokenizer = tokenizer or load_tokenizer(resolved)
        model = load_model(resolved, device=device, device_map=device_map)
        model_name = model_name or name
    if tokenizer is None:
        raise DataError("evaluate() needs a tokenizer when given a model object")
    texts = load_texts(data, split="test")
    model.eval()
    device = _model_device(model)
    reset_peak_memory(device)
    context = getattr(model.config, "max_position_embeddings", None) or 512
    block_size = block_size or min(context, 512)
    check_block_size(block_size, model.config)

    stream = token_stream(texts, tokenizer)
    tokens_per_byte = stream.numel() / utf8_bytes(texts)
    if stride is not None and stride != block_size:
        blocks, score_from = strided_windows(stream, block_size, stride)
        if num_blocks is not None:
            blocks = blocks[:num_blocks]
        # The first window is scored from position 1, later ones only on their last `stride` tokens.
        nll, count = negative_log_likelihood(model, blocks[:1], batch_size=1)
        if blocks.shape[0] > 1:
            more_nll, more_count = negative_log_likelihood(model, blocks[1:], batch_size=batch_size,
                                                           score_from=score_from, progress=progress)
            nll, count = nll + more_nll, count + more_count
    else:
        blocks = pack_stream(stream, block_size, num_blocks=num_blocks, seed=seed)
        nll, count = negative_log_likelihood(model, blocks, batch_size=batch_size, progress=progress)

    result = EvalResult(
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        data=data_label or (data if isinstance(data, str) else f"<{type(data).__name__}>"),
        block_size=block_size,
        num_blocks=int(blocks.shape[0]),
        scored_tokens=count,
        perplexity=math.exp(nll / count),
        bits_per_byte=nll / count / math.log(2) * tokens_per_byte,
        num_parameters=count_parameters(model),
        weight_bytes=weight_bytes(model),
        checkpoint_bytes=checkpoint_bytes(checkpoint_dir) if checkpoint_dir else None,
        dtype=str(next(model.parameters()).dtype).replace("torch.", "") if any(True for _ in model.parameters()) else None,
        device=str(device),
    )
    if speed:
        prompt_len = max(1, min(prompt_tokens, block_size - new_tokens - 1))
        n_new = max(2, min(new_tokens, context - prompt_len))
        prompt = blocks[:1, :prompt_len]
        timings = measure_speed(model, prompt, new_tokens=n_new)
        result.prefill_tokens_per_s = timings["prefill_tokens_per_s"]
        result.decode_tokens_per_s = timings["decode_tokens_per_s"]
        result.extra["speed"] = timings
    result.peak_rss_bytes = peak_rss_bytes()
    result.peak_gpu_memory_bytes = peak_memory_bytes(device)
    if kl_reference is not None:
        reference = load_model(resolve_model(os.fspath(kl_reference)), device=device, device_map=device_map) \
            if isinstance(kl_reference, (str, os.PathLike)) else kl_reference
        reference.eval()
        result.kl_to_reference = kl_to_reference(model, reference, blocks, batch_size=batch_size, progress=progress)
        result.extra["kl_reference"] = os.fspath(kl_reference) if isinstance(kl_reference, (str, os.PathLike)) \
            else type(kl_reference).__name__
    return result
