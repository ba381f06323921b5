"""Offline distillation from a teacher cache: run the teacher once, store its top-k next-token distribution
per predicted token, then train students with no teacher in memory.

What is stored per predicted token (the ``k`` most likely ids at temperature ``T`` and the rest as one tail
bucket — the top-k + tail KL of e.g. DistillKit/Sparse-KD):

* ``ids`` (``id_coding="ranked-rice"``, the default): each shard keeps a ``rank_table`` of the ids its rows
  hold, most frequent first; a row's ids become ranks in it, sorted ascending, and the first rank and the gaps
  minus one are Rice-coded with the row's best parameter (one byte-aligned bit string per row, ``rice_len``
  bytes, ``rice_param``). Frequent tokens are in most rows' top-k, so ranks are small and close: about 70 bytes
  for 64 ids of SmolLM2's 49k vocabulary. ``"fixed"`` (version 1's format): the ids sorted ascending, the first
  id (uint16/uint32) and the ``k - 1`` gaps minus one bit-packed at the width of the row's largest gap
  (rows grouped by width; ``width`` says which): ~110 bytes there;
* log-probabilities in the same order as the ids: ``uint8``/``uint7``/``uint6`` codes ``round((top - logp) / step)``
  with a per-row float16 ``step`` (error <= step/2; ``top`` is not stored: the k probabilities and the tail
  sum to one), bit-packed below 8 bits; or ``float16``/``float32`` values;
* ``log_tail``: log of the probability mass outside the top-k (``-inf`` when k = vocabulary size);
* optionally (``tail_draws`` = m > 0), m draws per position from the teacher's distribution *outside* the top-k,
  stored as the distinct ids (ranks in the same table, Rice-coded: ``tail_*``) and their counts (``count_*``).
  The tail's mass is then spread over the drawn ids in proportion to their counts instead of forming one bucket:
  an unbiased estimate of the live forward-KL gradient whose noise is confined to the tail (:func:`tail_rows`);
* optionally (``hidden_layers``), the selected teacher layers' hidden states, one (rows, hidden) tensor per layer
  in float16 (default), bfloat16 or float32, in a ``hidden-NNNNN.safetensors`` file beside each shard. Layer ``i``
  is the output of block ``i`` as in :mod:`.hidden` (the last one after the final norm). These are read lazily,
  block by block (they are ``2·hidden`` bytes per token and layer in float16: far more than the logits' ~120).

Shards are safetensors files (plus the training blocks' token ids, so a cache is its own training set);
``cache.json`` holds the metadata the trainer checks: teacher name and weight hash, tokenizer hash, k,
temperature, vocabulary size and a fingerprint of the token blocks, and the hidden layers, width and dtype.

The loss (:func:`bucket_logprobs`): the student's and the teacher's distributions restricted to the k + 1
buckets (the cached ids, everything else); any divergence of :class:`~.losses.LogitLoss` applies to them. With
k = vocabulary size there is no tail bucket and the loss is the live-teacher loss exactly (up to the stored
precision); for smaller k it is a lower bound of the full forward KL (data-processing inequality), whose gap
:func:`approximation_error` measures for a given student. Its gradient is biased: inside the tail the student
keeps its own proportions. With tail draws the rows decode to k + m ids whose teacher log-probs are the top-k's
and ``log p_tail + log(count / m)`` (count 0: no mass), with no tail bucket; the same loss code then follows the
unbiased gradient ``q − p̂``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import ConfigError, DataError, HFCompressError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: ranked-Rice ids (id_coding); 3: tail draws (tail_draws); versions 1-2 still read
READABLE_VERSIONS = (1, 2, 3)
ID_CODINGS = ("ranked-rice", "fixed")
SAMPLINGS = ("top-k", "sample")
METADATA_FILE = "cache.json"
LOGPROB_FORMATS = ("uint8", "uint7", "uint6", "float16", "float32")
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TeacherCacheError(HFCompressError):
    """A teacher cache that does not match the run reading it (tokenizer, k, teacher, temperature)."""


# --------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------
def tensor_hash(tensors) -> str:
    """sha256 over named tensors' bytes, in name order (a teacher's weights, a block tensor)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def weights_hash(model) -> str:
    return tensor_hash(model.state_dict().items())


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps({"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_tokens))})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Encoding (pure functions of arrays)
# --------------------------------------------------------------------------------------------------------
def _id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, m) non-negative ints < 2**width -> (n, ceil(m*width/8)) uint8, little-endian bit order."""
    bits = (values[..., None] >> np.arange(width, dtype=values.dtype)) & 1  # (n, m, width)
    return np.packbits(bits.reshape(values.shape[0], -1).astype(np.uint8), axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (n, bytes) uint8 -> (n, count) int64."""
    bits = np.unpackbits(packed, axis=1, count=count * width, bitorder="little")
    return (bits.reshape(packed.shape[0], count, width).astype(np.int64) << np.arange(width)).sum(-1)


def rank_table(ids: torch.Tensor) -> np.ndarray:
    """The ids a shard's rows hold, most frequent first (ties by id): the shard's ``rank_table``. Ranked this
    way, a row's top-k ids become small, close numbers (frequent tokens are in most rows' top-k)."""
    values, counts = np.unique(ids.reshape(-1).cpu().numpy(), return_counts=True)
    order = np.lexsort((values, -counts))
    table = values[order]
    return table.astype(np.uint16 if table.size and table.max() < 1 << 16 else np.uint32)


def rice_encode(values: np.ndarray, prefix: str = "rice") -> dict[str, np.ndarray]:
    """Rows of non-negative integers (n, k) -> Rice codes, one byte-aligned bit string per row.

    Each row picks the parameter b (``rice_param``) that makes it shortest; a value v is written as v >> b in
    unary (that many ones, then a zero), the k unary parts first, then the k low parts of b bits each (so that
    the k-th zero of a row ends its unary parts). ``rice_len`` is each row's length in bytes.
    """
    n, k = values.shape
    params = np.arange(24)
    cost = (values[:, :, None] >> params).sum(1) + k * (1 + params)[None, :]  # (n, 24) bits
    b = cost.argmin(1).astype(np.int64)  # (n,)
    high = values >> b[:, None]
    low = values & ((1 << b[:, None]) - 1)
    unary = high.sum(1) + k  # (n,) bits
    length = (unary + k * b + 7) // 8  # (n,) bytes
    start = 8 * (np.cumsum(length) - length)  # (n,) first bit of each row
    bits = np.zeros(8 * int(length.sum()), dtype=np.uint8)
    ones = np.repeat(start, unary) + np.arange(int(unary.sum())) - np.repeat(np.cumsum(unary) - unary, unary)
    bits[ones] = 1
    bits[(start[:, None] + np.cumsum(high + 1, axis=1) - 1).reshape(-1)] = 0  # the terminators
    width = int(b.max()) if n else 0
    if width:
        j, bit = np.arange(k)[None, :, None], np.arange(width)[None, None, :]
        used = bit < b[:, None, None]  # (n, 1, width)
        where = (start + unary)[:, None, None] + j * b[:, None, None] + bit  # (n, k, width)
        mask = np.broadcast_to(used, where.shape)
        bits[where[mask]] = ((low[:, :, None] >> bit) & 1).astype(np.uint8)[mask]
    return {f"{prefix}_bytes": np.packbits(bits, bitorder="little"),
            f"{prefix}_len": length.astype(np.uint8 if n == 0 or length.max() < 256 else np.uint16),
            f"{prefix}_param": b.astype(np.uint8)}


def rice_decode(data: np.ndarray, lengths: np.ndarray, params: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`rice_encode` for consecutive rows: their bytes ``data``, byte lengths and parameters."""
    n = lengths.shape[0]
    bits = np.unpackbits(data, bitorder="little")
    start = 8 * (np.cumsum(lengths.astype(np.int64)) - lengths)  # (n,)
    zeros = np.flatnonzero(bits == 0)
    ends = zeros[np.searchsorted(zeros, start)[:, None] + np.arange(k)]  # (n, k) the terminators
    before = np.concatenate([start[:, None] - 1, ends[:, :-1]], axis=1)
    high = ends - before - 1
    b = params.astype(np.int64)
    width = int(b.max()) if n else 0
    low = np.zeros((n, k), dtype=np.int64)
    if width:
        bit = np.arange(width)[None, None, :]
        used = bit < b[:, None, None]
        where = (ends[:, -1] + 1)[:, None, None] + np.arange(k)[None, :, None] * b[:, None, None] + bit
        low = ((bits[np.where(used, where, 0)].astype(np.int64) * used) << bit).sum(-1)
    return (high << b[:, None]) | low


def sample_rows(logp: torch.Tensor, draws: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """``draws`` tokens per row from the teacher's distribution (n, V) log-probs, with replacement -> the distinct
    ids and their counts, in ``draws`` slots per row (n, draws): slots past a row's distinct ids hold count 0 and
    id -1 (filled by :func:`pad_sampled_ids` once the shard's rank table is known).

    The empirical distribution counts / draws is an unbiased estimate of the teacher's, so the forward-KL
    gradient against it, q − counts / draws, is unbiased for the live gradient q − p (random-sampling KD,
    Anshumann et al. 2025): unlike the top-k + tail buckets, no part of the teacher's distribution is dropped.
    """
    return distinct_draws(torch.multinomial(logp.exp(), draws, replacement=True, generator=generator))


def tail_rows(logp: torch.Tensor, top_ids: torch.Tensor, draws: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` tokens per row from the teacher's distribution restricted to the ids outside ``top_ids`` (n, k)
    and renormalised -> distinct ids and counts, as :func:`sample_rows`. ``logp`` (n, V) is overwritten.

    Stored beside the top-k, they replace the tail bucket: the tail mass ``p_tail`` goes to the drawn ids as
    ``p_tail · count / draws``, whose expectation is the teacher's own ``p_j``. The forward-KL gradient
    ``q − p̂`` is then unbiased, with the sampling noise scaled by ``p_tail`` (the top-k part is exact). A row
    whose tail underflowed to zero draws uniformly from it: its ``p_tail`` of 0 gives those draws no mass.
    """
    weights = logp.scatter_(-1, top_ids, float("-inf")).exp_()  # (n, V) the tail, unnormalised
    empty = weights.sum(-1) <= 0
    if bool(empty.any()):
        weights[empty] = torch.ones_like(weights[empty]).scatter_(-1, top_ids[empty], 0.0)
    return distinct_draws(torch.multinomial(weights, draws, replacement=True, generator=generator))


def distinct_draws(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn ids (n, S) -> (distinct ids, counts) in S slots per row, the distinct ids ascending first; the
    slots past them hold id −1 and count 0."""
    drawn = drawn.sort(-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(-1) - 1  # (n, S) the distinct-id slot of every draw
    counts = torch.zeros_like(drawn).scatter_add_(-1, slot, torch.ones_like(drawn))
    ids = torch.full_like(drawn, -1).scatter_(-1, slot, drawn)
    return ids, counts


def pad_sampled_ids(ids: torch.Tensor, rank_of: np.ndarray, table: np.ndarray,
                    reserved: torch.Tensor | None = None) -> torch.Tensor:
    """Give a sampled row's empty slots (id -1) distinct ids it does not hold: the lowest-ranked ids of the shard's
    table missing from the row (and from the row's ``reserved`` ids, e.g. its top-k), so that as ranks they cost a
    few bits each. Count 0: no probability."""
    out = ids.numpy().astype(np.int64)
    empty = out < 0
    if not empty.any():
        return ids
    n, slots = out.shape
    if reserved is not None:  # held too: the padding must not repeat them
        out = np.concatenate([out, reserved.numpy().astype(np.int64)], axis=1)
        empty = np.concatenate([empty, np.zeros(reserved.shape, dtype=bool)], axis=1)
    width = min(2 * out.shape[1], table.size)  # candidates: ranks 0..width-1; at most half of them are held
    held = np.where(empty, width, rank_of[np.where(empty, 0, out)])
    mark = np.zeros((n, width + 1), dtype=bool)
    np.put_along_axis(mark, np.minimum(held, width), True, axis=1)
    free = ~mark[:, :width]  # (n, width)
    need = empty.sum(1)
    if bool((free.sum(1) < need).any()):
        raise HFCompressError("teacher cache: too few distinct ids to pad the sampled rows (a vocabulary smaller "
                              "than twice the draws?); use fewer draws")
    lowest = np.argsort(~free, axis=1, kind="stable")  # free ranks first, in increasing order
    slot = np.cumsum(empty, axis=1) - 1  # the k-th empty slot takes the k-th lowest free rank
    fill = np.take_along_axis(lowest, np.where(empty, slot, 0), axis=1)
    out[empty] = table.astype(np.int64)[fill[empty]]
    return torch.from_numpy(out[:, :slots])


def encode_rows(ids: torch.Tensor, logp: torch.Tensor | None, log_tail: torch.Tensor | None, vocab_size: int,
                logprob_format: str, table: np.ndarray | None = None,
                counts: torch.Tensor | None = None, id_prefix: str = "rice") -> dict[str, np.ndarray]:
    """Top-k ``ids`` (n, k), their log-probs (n, k) and the tail log-mass (n,) -> arrays to store.

    With a ``table`` (:func:`rank_table`; ``id_coding="ranked-rice"``) the ids are written as their ranks in it,
    sorted ascending, as Rice codes of the first rank and the gaps minus one (:func:`rice_encode`); without one
    (``"fixed"``), as the ids sorted ascending: the first id and the gaps minus one at the row's largest gap's
    width. The log-probs follow the same order. Sampled rows (``counts``, with a table) store the counts
    instead of log-probs and tail (Rice-coded, ``count_*``); ``id_prefix`` names their id stream (``tail`` for
    the draws beside a top-k row).
    """
    if table is not None:
        rank_of = np.full(vocab_size, -1, dtype=np.int64)
        rank_of[table.astype(np.int64)] = np.arange(table.size)
        keys = torch.from_numpy(rank_of[ids.cpu().numpy()])
    else:
        keys = ids.cpu()
    order = keys.argsort(dim=-1)
    sorted_keys = keys.gather(-1, order).numpy().astype(np.int64)  # (n, k) ascending
    out: dict[str, np.ndarray] = {}
    if table is not None:
        values = np.concatenate([sorted_keys[:, :1], np.diff(sorted_keys, axis=1) - 1], axis=1)
        out.update(rice_encode(values, prefix=id_prefix))
    else:
        out["first_id"] = sorted_keys[:, 0].astype(_id_dtype(vocab_size))
        gaps = np.diff(sorted_keys, axis=1) - 1  # (n, k-1) >= 0
        width = np.zeros(sorted_keys.shape[0], dtype=np.uint8)
        if gaps.shape[1]:
            width = np.ceil(np.log2(gaps.max(axis=1) + 1)).astype(np.uint8)  # bits of the largest gap
            for b in np.unique(width):
                if b:
                    out[f"gaps_w{b}"] = pack_bits(gaps[width == b], int(b))
        out["width"] = width
    if counts is not None:
        out.update(rice_encode(counts.cpu().gather(-1, order).numpy().astype(np.int64), prefix="count"))
        return out
    logp = logp.cpu().gather(-1, order).float()
    if logprob_format.startswith("uint"):
        bits = int(logprob_format[4:])
        levels = (1 << bits) - 1
        top = logp.max(-1).values  # (n,)
        spread = (top - logp.min(-1).values).clamp_min(1e-6)
        step = (spread / levels).half().float()  # stored as float16: codes use the stored value
        codes = ((top[:, None] - logp) / step[:, None]).round().clamp(0, levels).to(torch.int64).numpy()
        # The top log-prob itself is not stored: the k values and the tail sum to one (see decode_rows).
        out.update(logp_codes=codes.astype(np.uint8) if bits == 8 else pack_bits(codes, bits),
                   logp_step=step.half().numpy())
    else:
        dtype = np.float16 if logprob_format == "float16" else np.float32
        out["logp"] = logp.numpy().astype(dtype)
    out["log_tail"] = log_tail.float().cpu().numpy().astype(np.float16 if logprob_format != "float32" else np.float32)
    return out


def row_offsets(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Byte offset of each Rice-coded row (n + 1,), per Rice stream of a shard (``rice`` ids, ``tail`` drawn
    ids, ``count`` counts)."""
    return {prefix: np.concatenate([[0], np.cumsum(arrays[f"{prefix}_len"].astype(np.int64))])
            for prefix in ("rice", "tail", "count") if f"{prefix}_len" in arrays}


def _rice_rows(arrays: dict[str, np.ndarray], prefix: str, rows: np.ndarray, k: int,
               offsets: np.ndarray) -> np.ndarray:
    """The Rice-coded values (n, k) of ``rows`` of a shard's ``prefix`` stream, decoded run by run of
    consecutive rows (a block's rows are one run)."""
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []
    values = [rice_decode(arrays[f"{prefix}_bytes"][offsets[run[0]]:offsets[run[-1] + 1]],
                          arrays[f"{prefix}_len"][run], arrays[f"{prefix}_param"][run], k) for run in runs]
    return np.concatenate(values) if values else np.zeros((0, k), dtype=np.int64)


def decode_rows(arrays: dict[str, np.ndarray], rows: np.ndarray, k: int, logprob_format: str = "uint8",
                offsets: dict[str, np.ndarray] | None = None, tail_draws: int = 0) -> tuple[torch.Tensor, ...]:
    """Selected ``rows`` of a shard -> (ids (n, k) int64, log-probs (n, k) float32, tail log-mass (n,)), in the
    stored order. ``offsets``: :func:`row_offsets` of the shard, if already computed. With ``tail_draws`` = m
    (a top-k shard holding tail draws) the rows are k + m wide: the top-k, then the drawn tail ids with log-probs
    ``log p_tail + log(count / m)`` (−1e4 for count 0), and the tail log-mass is −inf (no tail bucket left)."""
    rows = np.asarray(rows)
    offsets = row_offsets(arrays) if offsets is None else offsets
    if tail_draws:
        ids, logp, tail = decode_rows(arrays, rows, k, logprob_format, offsets)
        ranks = np.cumsum(_rice_rows(arrays, "tail", rows, tail_draws, offsets["tail"]) + 1, axis=1) - 1
        drawn = torch.from_numpy(arrays["rank_table"].astype(np.int64)[ranks])
        counts = torch.from_numpy(_rice_rows(arrays, "count", rows, tail_draws, offsets["count"])).float()
        share = torch.where(counts > 0, tail[:, None] + (counts / tail_draws).log(), torch.full_like(counts, -1e4))
        return (torch.cat([ids, drawn], 1), torch.cat([logp, share.clamp_min(-1e4)], 1),
                torch.full_like(tail, float("-inf")))
    if "rice_bytes" in arrays:
        ranks = np.cumsum(_rice_rows(arrays, "rice", rows, k, offsets["rice"]) + 1, axis=1) - 1
        ids = arrays["rank_table"].astype(np.int64)[ranks]
    else:
        first = arrays["first_id"][rows].astype(np.int64)
        width = arrays["width"]
        gaps = np.zeros((len(rows), k - 1), dtype=np.int64)
        row_width = width[rows]
        for b in np.unique(row_width):
            if not b:
                continue
            members = np.flatnonzero(width == b)  # rows of this width, in order: their position in gaps_w{b}
            wanted = np.flatnonzero(row_width == b)
            index = np.searchsorted(members, rows[wanted])
            gaps[wanted] = unpack_bits(arrays[f"gaps_w{b}"][index], int(b), k - 1)
        ids = np.concatenate([first[:, None], first[:, None] + np.cumsum(gaps + 1, axis=1)], axis=1)
    if "count_bytes" in arrays and "tail_bytes" not in arrays:  # sampled rows: p = count / draws, no tail
        counts = torch.from_numpy(_rice_rows(arrays, "count", rows, k, offsets["count"])).float()
        logp = torch.where(counts > 0, (counts / k).log(), torch.full_like(counts, -1e4))
        return torch.from_numpy(ids), logp, torch.full((len(rows),), float("-inf"))
    tail = torch.from_numpy(arrays["log_tail"][rows].astype(np.float32))
    if logprob_format.startswith("uint"):
        bits = int(logprob_format[4:])
        codes = arrays["logp_codes"][rows]
        codes = codes.astype(np.int64) if bits == 8 else unpack_bits(codes, bits, k)
        step = torch.from_numpy(arrays["logp_step"][rows].astype(np.float32))
        offsets_lp = -torch.from_numpy(codes).float() * step[:, None]  # log p - log p_top, (n, k)
        # log p_top from the normalisation: p_top * sum exp(offsets) = 1 - tail mass.
        top = torch.log(-torch.expm1(tail.clamp(max=-1e-7))) - offsets_lp.logsumexp(-1)
        top = torch.where(torch.isinf(tail), -offsets_lp.logsumexp(-1), top)
        logp = top[:, None] + offsets_lp
    else:
        logp = torch.from_numpy(arrays["logp"][rows].astype(np.float32))
    return torch.from_numpy(ids), logp, tail


# --------------------------------------------------------------------------------------------------------
# The loss on k + 1 buckets
# --------------------------------------------------------------------------------------------------------
def bucket_logprobs(student_logp: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                    teacher_log_tail: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the buckets (the k cached ids, then the tail), (N, k[+1]) each.

    ``student_logp`` (N, V) are the student's log-probs at the cache's temperature. The student's tail is
    ``logsumexp`` of its log-probs outside the ids (exact, no ``log(1 - sum)`` cancellation). The teacher's
    buckets are renormalised, so quantized log-probs still form a distribution. With k = V there is no tail.
    """
    student_top = student_logp.gather(-1, ids)  # (N, k)
    if ids.shape[-1] >= vocab_size:
        teacher = teacher_logp
        student = student_top
    else:
        outside = student_logp.scatter(-1, ids, float("-inf"))
        student = torch.cat([student_top, outside.logsumexp(-1, keepdim=True)], dim=-1)  # (N, k+1)
        teacher = torch.cat([teacher_logp, teacher_log_tail[:, None].clamp_min(-1e4)], dim=-1)
    return student, teacher - teacher.logsumexp(-1, keepdim=True)


def bucket_forward_kl_grad(student_logp: torch.Tensor, ids: torch.Tensor, student_buckets: torch.Tensor,
                           teacher_buckets: torch.Tensor) -> torch.Tensor:
    """``q − p̂``: the gradient of the bucket forward KL ``Σ_b p_b (log p_b − log q_b)`` w.r.t. the student's
    logits at the cache's temperature (u = z/T), (N, V), in closed form (no autograd graph over the vocabulary).

    ``student_logp`` (N, V) = log q; ``student_buckets``/``teacher_buckets`` from :func:`bucket_logprobs`. With
    ``q_b = Σ_{j∈b} q_j``, ``∂(−log q_b)/∂u_j = q_j − 1[j∈b]·q_j/q_b``, so the gradient is ``q_j − p̂_j`` where
    ``p̂_i = p_i`` on the cached ids and ``p̂_j = q_j · p_tail / q_tail`` elsewhere: the teacher's tail mass spread
    over the tail in the student's own proportions. Computed as ``exp(log q_j + log p_tail − log q_tail)``, which
    stays finite when ``q_tail`` underflows.
    """
    q = student_logp.exp()  # (N, V)
    k = ids.shape[-1]
    if teacher_buckets.shape[-1] > k:  # a tail bucket
        shift = (teacher_buckets[:, k] - student_buckets[:, k])[:, None]  # log p_tail − log q_tail, (N, 1)
        grad = q - (student_logp + shift).exp_()  # q_j (1 − p_tail/q_tail); cached ids overwritten next
    else:
        grad = q.clone()
    return grad.scatter_(-1, ids, q.gather(-1, ids) - teacher_buckets[:, :k].exp())


def bucket_forward_kl_t1(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                         teacher_log_tail: torch.Tensor, targets: torch.Tensor, kd_weight: float, ce_weight: float,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The cache's default objective at T = 1 in few passes over the (C, V) logits: ``kd_weight`` × the bucket
    forward KL + ``ce_weight`` × cross-entropy, per position, and its logit gradient.

    The same numbers as :func:`bucket_logprobs` + the divergence + :func:`bucket_forward_kl_grad` + the
    cross-entropy gradient (tested), with about four passes over the vocabulary instead of about ten: the
    log-softmax, its exponential in place, the row sums, and the gradient written into ``q`` in place:
    ``g_j = q_j (kd + ce − kd · p_tail / q_tail)`` outside the ids, ``(kd + ce) q_i − kd · p_i`` on them,
    minus ``ce`` at the target. The student's tail mass ``q_tail`` is the row sum minus the ids' share; where
    that difference loses more than ~1e-3 of its value to rounding (a tail below 1e-3 of the row), it is
    recomputed exactly as a log-sum-exp over the tail, as :func:`bucket_logprobs` does.
    Returns (weighted, kd, ce) per position (C,) and the gradient (C, V) or None.
    """
    k = ids.shape[-1]
    q = F.log_softmax(student_logits, dim=-1)  # (C, V) log q for now: one fused pass
    student_top = q.gather(-1, ids)  # (C, k) log q on the ids
    ce = -q.gather(-1, targets[:, None])[:, 0]
    q = q.exp_()  # (C, V) q
    q_top = student_top.exp()
    if k >= student_logits.shape[-1]:
        student = student_top
        teacher = teacher_logp
    else:
        rest = q.sum(-1) - q_top.sum(-1)  # (C,) the tail mass, by difference
        log_tail = rest.clamp_min(1e-30).log()
        fix = rest < 1e-3
        if bool(fix.any()):  # a tiny tail: exactly, from the logits (as bucket_logprobs)
            rows = fix.nonzero()[:, 0]
            few = student_logits[rows]
            log_tail[rows] = few.scatter(-1, ids[rows], float("-inf")).logsumexp(-1) - few.logsumexp(-1)
        student = torch.cat([student_top, log_tail[:, None]], dim=-1)  # (C, k+1)
        teacher = torch.cat([teacher_logp, teacher_log_tail[:, None].clamp_min(-1e4)], dim=-1)
    teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    p = teacher.exp()
    kd = (p * (teacher - student)).sum(-1)  # forward KL on the buckets, as losses.forward_kl
    weighted = kd_weight * kd + ce_weight * ce
    if not need_grad:
        return weighted, kd, ce, None
    both = kd_weight + ce_weight
    if k < student_logits.shape[-1]:
        ratio = (teacher[:, k] - student[:, k]).exp()  # p_tail / q_tail, (C,)
        grad = q.mul_((both - kd_weight * ratio)[:, None])
    else:
        grad = q.mul_(both)
    grad.scatter_(-1, ids, both * q_top - kd_weight * p[:, :k])
    if ce_weight:
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= ce_weight
    return weighted, kd, ce, grad


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
@dataclass
class CacheMetadata:
    teacher: str
    teacher_hash: str
    tokenizer_hash: str
    top_k: int
    temperature: float
    vocab_size: int
    data_fingerprint: str
    num_blocks: int
    block_size: int
    logprob_format: str
    shards: list
    bytes_per_token: float  # the teacher signal (ids, log-probs, tail), not the training tokens
    tokens: int
    mean_tail_mass: float
    quantization_kl: float  # mean KL(exact buckets ‖ stored buckets): what the storage precision costs
    format_version: int = FORMAT_VERSION
    # Hidden states (empty when none were stored; caches written before they existed read as such).
    hidden_layers: list = field(default_factory=list)  # 0-based teacher layers, as in hidden.py
    hidden_size: int = 0
    hidden_dtype: str = ""
    hidden_bytes_per_token: float = 0.0  # all stored layers together
    teacher_num_layers: int = 0  # to resolve layer_map='uniform'/'last' without the teacher
    id_coding: str = "fixed"  # how the ids are stored (version 1 caches: fixed)
    sampling: str = "top-k"  # "sample": top_k draws from the teacher per position, stored as ids and counts
    mean_distinct: float = 0.0  # distinct ids per position (top_k for top-k caches; + the distinct tail draws)
    tail_draws: int = 0  # draws per position from the teacher outside the top-k (version 3)


def _padding_table(table: np.ndarray, needed: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's rank table with at least ``needed`` ids (unseen ones appended, for tiny caches: padding draws
    needs twice a row's slots of ranked ids), and the rank of every id (0 for ids not in it)."""
    if table.size < needed:
        unseen = np.setdiff1d(np.arange(vocab), table.astype(np.int64))[:needed - table.size]
        table = np.concatenate([table.astype(np.int64), unseen]).astype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    rank_of = np.zeros(vocab, dtype=np.int64)
    rank_of[table.astype(np.int64)] = np.arange(table.size)
    return table, rank_of


def check_destination(out_dir) -> Path:
    """A cache is never written over another folder's contents."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new folder for the teacher cache")
    return out_dir


@torch.no_grad()
def write_teacher_cache(teacher, blocks: torch.Tensor, out_dir, top_k: int = 64, temperature: float = 1.0,
                        tokenizer=None, teacher_name: str = "", logprob_format: str = "uint7",
                        batch_size: int = 8, blocks_per_shard: int = 512, progress: bool = True,
                        hidden_layers: list[int] | None = None, hidden_dtype: str = "float16",
                        id_coding: str = "ranked-rice", sampling: str = "top-k", seed: int = 0,
                        tail_draws: int = 0) -> CacheMetadata:
    """Run ``teacher`` once over ``blocks`` (N, T) and write the cache to ``out_dir`` (must not exist or be empty).

    ``sampling``: ``"top-k"`` stores the ``top_k`` most likely ids with their log-probs and the tail mass (the
    top-k + tail-bucket loss, a lower bound of the full KL); ``"sample"`` draws ``top_k`` tokens per position from
    the teacher's distribution (``seed``) and stores the distinct ids with their counts (:func:`sample_rows`):
    an unbiased estimate of the live forward-KL gradient, for ``loss="forward_kl"`` (ranked-Rice ids only).

    ``tail_draws`` = m > 0 (top-k caches, ranked-Rice ids): also m draws per position from the teacher's
    distribution outside the top-k (``seed``), stored as distinct ids and counts (:func:`tail_rows`). Training
    then follows an unbiased estimate of the live forward-KL gradient (``loss="forward_kl"`` only) instead of the
    biased top-k + tail bucket one, for a few more bytes per token (about 2 bytes per draw on SmolLM2).

    ``id_coding``: ``"ranked-rice"`` (default) stores each row's ids as their ranks in the shard's own frequency
    table, Rice-coded (:func:`rice_encode`; ~70 bytes for 64 ids of a 49k vocabulary against ~110 fixed-width);
    ``"fixed"`` as sorted ids at the row's largest gap's width (version 1's format). A shard's top-k rows are
    held in memory until it is written (k x 8 bytes per position; ``blocks_per_shard`` bounds it).

    ``hidden_layers`` (0-based teacher layers) also stores those layers' hidden states per predicted token, in
    ``hidden_dtype``, for hidden-state distillation from the cache (``DistillationConfig.hidden_weight``).
    """
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch_file

    from .hidden import hidden_width, num_layers

    if logprob_format not in LOGPROB_FORMATS:
        raise ConfigError(f"logprob_format={logprob_format!r} is unknown; choose one of {', '.join(LOGPROB_FORMATS)}")
    if id_coding not in ID_CODINGS:
        raise ConfigError(f"id_coding={id_coding!r} is unknown; choose one of {', '.join(ID_CODINGS)}")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling={sampling!r} is unknown; choose one of {', '.join(SAMPLINGS)}")
    if sampling == "sample" and id_coding != "ranked-rice":
        raise ConfigError("sampling='sample' stores its ids as ranked Rice codes; use id_coding='ranked-rice'")
    if tail_draws < 0 or tail_draws and (sampling != "top-k" or id_coding != "ranked-rice"):
        raise ConfigError(f"tail_draws={tail_draws}: tail draws are a number >= 0 and go beside a top-k cache "
                          f"with ranked-Rice ids (sampling='top-k', id_coding='ranked-rice')")
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise DataError("the teacher cache needs a non-empty (num_blocks, block_size >= 2) tensor of token ids")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))  # padded embedding rows are never real tokens
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"top_k must be in 1..{vocab} (the vocabulary size), got {top_k}")
    if tail_draws and top_k + 2 * tail_draws > vocab:
        raise ConfigError(f"top_k + 2 x tail_draws = {top_k + 2 * tail_draws} exceeds the vocabulary ({vocab}): "
                          f"the tail is too small to sample; use fewer tail draws or a smaller top_k")
    layers = check_hidden_layers(hidden_layers, num_layers(teacher), hidden_dtype)
    out_dir = check_destination(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.eval()
    device = next(teacher.parameters()).device
    shards, stored_bytes, hidden_bytes, tokens, tail_mass, quant_kl = [], 0, 0, 0, 0.0, 0.0
    sampled, distinct = sampling == "sample", 0
    generator = torch.Generator(device=device).manual_seed(seed) if sampled or tail_draws else None
    for shard_start in range(0, blocks.shape[0], blocks_per_shard):
        shard_blocks = blocks[shard_start:shard_start + blocks_per_shard]
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (ids int32, logp, log tail) per batch
        drawn_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tail ids, counts) per batch, with tail_draws
        states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        for start in tqdm(range(0, shard_blocks.shape[0], batch_size), desc="teacher cache", disable=not progress):
            batch = shard_blocks[start:start + batch_size]
            out = teacher(input_ids=batch.to(device), output_hidden_states=bool(layers))
            for layer in layers:  # hidden_states[i + 1] is block i's output; positions 0..T-2 predict
                states[layer].append(_stored_states(out.hidden_states[layer + 1][:, :-1], hidden_dtype, layer))
            logits = out.logits[:, :-1, :vocab].float()  # (B, T-1, V)
            logp = F.log_softmax(logits / temperature, dim=-1).reshape(-1, vocab)  # (n, V)
            if sampled:
                drawn_ids, drawn_counts = sample_rows(logp, top_k, generator)
                found.append((drawn_ids.to(torch.int32).cpu(), drawn_counts.to(torch.int16).cpu(), None))
                continue
            top_logp, top_ids = logp.topk(top_k, dim=-1)  # (n, k)
            log_tail = torch.log1p(-top_logp.exp().sum(-1).clamp(max=1.0)) if top_k < vocab \
                else torch.full((logp.shape[0],), float("-inf"))
            if tail_draws:  # overwrites logp: last use
                drawn_ids, drawn_counts = tail_rows(logp, top_ids, tail_draws, generator)
                drawn_parts.append((drawn_ids.to(torch.int32).cpu(), drawn_counts.to(torch.int16).cpu()))
            found.append((top_ids.to(torch.int32).cpu(), top_logp.cpu(), log_tail.cpu()))
        if sampled:
            drawn_ids, drawn_counts = (torch.cat(parts) for parts in list(zip(*found))[:2])
            del found
            table, rank_of = _padding_table(rank_table(drawn_ids[drawn_ids >= 0]), 2 * top_k, vocab)
            padded = pad_sampled_ids(drawn_ids.long(), rank_of, table)
            arrays = encode_rows(padded, None, None, vocab, logprob_format, table, counts=drawn_counts.long())
            arrays["rank_table"] = table
            back_ids, back_logp, _ = decode_rows(arrays, np.arange(padded.shape[0]), top_k, logprob_format)
            order, back = padded.argsort(-1), back_ids.argsort(-1)
            expected = torch.where(drawn_counts > 0, (drawn_counts.float() / top_k).log(), torch.tensor(-1e4))
            if not (torch.equal(padded.gather(-1, order), back_ids.gather(-1, back)) and
                    torch.equal(expected.gather(-1, order), back_logp.gather(-1, back))):
                raise HFCompressError("teacher cache: the stored samples do not decode to the drawn ones (a bug; "
                                      "please report it with the model and data)")
            distinct += int((drawn_counts > 0).sum())
            tokens += padded.shape[0]
            del drawn_ids, drawn_counts, padded, back_ids, back_logp
        else:
            top_ids, top_logp, log_tail = (torch.cat(parts) for parts in zip(*found))
            del found
            if tail_draws:
                drawn_ids, drawn_counts = (torch.cat(parts) for parts in zip(*drawn_parts))
                drawn_parts.clear()
                table, rank_of = _padding_table(rank_table(torch.cat([top_ids.reshape(-1),
                                                                      drawn_ids[drawn_ids >= 0]])),
                                                2 * (top_k + tail_draws), vocab)
            else:
                table = rank_table(top_ids) if id_coding == "ranked-rice" else None
            arrays = encode_rows(top_ids.long(), top_logp, log_tail, vocab, logprob_format, table)
            if table is not None:
                arrays["rank_table"] = table
            # What storage precision costs, measured on the buckets themselves (the stored order: ids and
            # log-probs come back sorted by id or by rank; compare as sets through each row's sort).
            ids_back, stored, stored_tail = decode_rows(arrays, np.arange(top_ids.shape[0]), top_k, logprob_format)
            order, back = top_ids.long().argsort(-1), ids_back.argsort(-1)
            if not torch.equal(top_ids.long().gather(-1, order), ids_back.gather(-1, back)):
                raise HFCompressError("teacher cache: the stored ids do not decode to the written ones (a bug; "
                                      "please report it with the model and data)")
            exact, stored = top_logp.gather(-1, order), stored.gather(-1, back)
            if top_k < vocab:
                exact = torch.cat([exact, log_tail[:, None]], -1)
                stored = torch.cat([stored, stored_tail[:, None]], -1)
            exact, stored = exact.clamp_min(-1e4), stored.clamp_min(-1e4)
            stored = stored - stored.logsumexp(-1, keepdim=True)
            quant_kl += F.kl_div(stored, exact, reduction="sum", log_target=True).item()
            tail_mass += log_tail.exp().sum().item()
            tokens += top_ids.shape[0]
            if tail_draws:
                padded = pad_sampled_ids(drawn_ids.long(), rank_of, table, reserved=top_ids.long())
                arrays.update(encode_rows(padded, None, None, vocab, logprob_format, table,
                                          counts=drawn_counts.long(), id_prefix="tail"))
                rows, offsets = np.arange(padded.shape[0]), row_offsets(arrays)
                tail_back = decode_rows(arrays, rows, top_k, logprob_format, offsets, tail_draws)[0][:, top_k:]
                counts_back = torch.from_numpy(_rice_rows(arrays, "count", rows, tail_draws, offsets["count"]))
                order, back = padded.argsort(-1), tail_back.argsort(-1)
                if not (torch.equal(padded.gather(-1, order), tail_back.gather(-1, back)) and
                        torch.equal(drawn_counts.long().gather(-1, order), counts_back.gather(-1, back))):
                    raise HFCompressError("teacher cache: the stored tail draws do not decode to the drawn ones (a "
                                          "bug; please report it with the model and data)")
                distinct += int((drawn_counts > 0).sum())
                del drawn_ids, drawn_counts, padded, tail_back, counts_back
            del top_ids, top_logp, log_tail, ids_back, stored, stored_tail, exact
        stored_bytes += sum(a.nbytes for a in arrays.values())
        arrays["input_ids"] = shard_blocks.cpu().numpy().astype(np.int32)
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(arrays, str(out_dir / name), metadata={"hfcompress": "teacher-cache", "version": str(FORMAT_VERSION)})
        shards.append({"file": name, "blocks": int(shard_blocks.shape[0])})
        if layers:
            tensors = {f"layer_{layer}": torch.cat(parts) for layer, parts in states.items()}  # (rows, H) each
            hidden_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            shards[-1]["hidden_file"] = f"hidden-{len(shards) - 1:05d}.safetensors"
            save_torch_file(tensors, str(out_dir / shards[-1]["hidden_file"]), metadata={"hfcompress": "teacher-cache"})
    metadata = CacheMetadata(
        teacher=teacher_name, teacher_hash=weights_hash(teacher),
        tokenizer_hash=tokenizer_hash(tokenizer) if tokenizer is not None else "", top_k=top_k,
        temperature=float(temperature), vocab_size=int(vocab), data_fingerprint=tensor_hash([("blocks", blocks)]),
        num_blocks=int(blocks.shape[0]), block_size=int(blocks.shape[1]),
        logprob_format="counts" if sampled else logprob_format,
        shards=shards, bytes_per_token=stored_bytes / tokens, tokens=tokens, mean_tail_mass=tail_mass / tokens,
        quantization_kl=quant_kl / tokens, hidden_layers=layers, hidden_size=hidden_width(teacher) if layers else 0,
        hidden_dtype=hidden_dtype if layers else "", hidden_bytes_per_token=hidden_bytes / tokens,
        teacher_num_layers=num_layers(teacher), id_coding=id_coding, sampling=sampling,
        mean_distinct=distinct / tokens if sampled else top_k + distinct / tokens, tail_draws=tail_draws)
    tmp = out_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(metadata), indent=2) + "\n")
    os.replace(tmp, out_dir / METADATA_FILE)  # written last: a folder without it is not a cache
    return metadata


def check_hidden_layers(hidden_layers, teacher_layers: int, hidden_dtype: str) -> list[int]:
    """The teacher layers whose hidden states a cache stores: sorted, unique, each in 0..teacher_layers-1."""
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ConfigError(f"hidden_dtype={hidden_dtype!r} is unknown; choose one of {', '.join(HIDDEN_DTYPES)}")
    layers = sorted({int(layer) for layer in hidden_layers or ()})
    bad = [layer for layer in layers if not 0 <= layer < teacher_layers]
    if bad:
        raise ConfigError(f"hidden layers {bad} do not exist: the teacher has {teacher_layers} layers "
                          f"(0..{teacher_layers - 1}); fix --hidden-layers")
    return layers


def _stored_states(states: torch.Tensor, hidden_dtype: str, layer: int) -> torch.Tensor:
    """(B, T-1, H) -> (B*(T-1), H) on the CPU in ``hidden_dtype``; float16 refuses values it cannot hold."""
    states = states.detach().float().reshape(-1, states.shape[-1]).cpu()
    if hidden_dtype == "float16" and states.abs().max() > torch.finfo(torch.float16).max:
        raise ConfigError(f"teacher layer {layer}'s hidden states reach {states.abs().max().item():.4g}, beyond "
                          f"float16's range; write the cache with --hidden-dtype bfloat16")
    return states.to(HIDDEN_DTYPES[hidden_dtype])


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
class TeacherCache:
    """A cache folder opened for training: metadata, the training blocks, and decoding of any rows."""

    def __init__(self, path):
        from safetensors.numpy import load_file

        self.path = Path(path)
        meta_file = self.path / METADATA_FILE
        if not meta_file.is_file():
            raise TeacherCacheError(f"{self.path} is not a teacher cache (no {METADATA_FILE}); write one with "
                                    f"`hfcompress cache-teacher TEACHER --out {self.path}`")
        data = json.loads(meta_file.read_text())
        if data.get("format_version") not in READABLE_VERSIONS:
            raise TeacherCacheError(f"{self.path}: cache format {data.get('format_version')} is not one this "
                                    f"version reads ({', '.join(map(str, READABLE_VERSIONS))}); rewrite it with "
                                    f"this version's `hfcompress cache-teacher`")
        self.meta = CacheMetadata(**data)
        self.shards = [load_file(str(self.path / shard["file"])) for shard in self.meta.shards]
        self._offsets = [row_offsets(shard) for shard in self.shards]  # once per shard, not per read
        self._starts = np.cumsum([0] + [shard["blocks"] for shard in self.meta.shards])
        self.rows_per_block = self.meta.block_size - 1
        self._hidden = [self._open_hidden(shard) for shard in self.meta.shards] if self.meta.hidden_layers else []

    def _open_hidden(self, shard: dict):
        """A shard's hidden-state file, opened for reading slices (memory-mapped; not loaded whole)."""
        from safetensors import safe_open

        path = self.path / shard.get("hidden_file", "")
        if not path.is_file():
            raise TeacherCacheError(f"{self.path}: {METADATA_FILE} lists hidden layers {self.meta.hidden_layers} "
                                    f"but {path.name} is missing; rewrite the cache with `hfcompress cache-teacher`")
        handle = safe_open(str(path), framework="pt")
        expected = [shard["blocks"] * self.rows_per_block, self.meta.hidden_size]
        for layer in self.meta.hidden_layers:
            name = f"layer_{layer}"
            shape = list(handle.get_slice(name).get_shape()) if name in handle.keys() else None
            if shape != expected:
                raise TeacherCacheError(f"{path}: hidden states of layer {layer} have shape {shape}, but "
                                        f"{METADATA_FILE} says {expected} (blocks x positions, hidden_size "
                                        f"{self.meta.hidden_size}); the cache is inconsistent: rewrite it")
        return handle

    def __len__(self) -> int:
        return self.meta.num_blocks

    def block(self, index: int) -> torch.Tensor:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return torch.from_numpy(self.shards[shard]["input_ids"][index - self._starts[shard]].astype(np.int64))

    def blocks(self) -> torch.Tensor:
        return torch.cat([torch.from_numpy(s["input_ids"].astype(np.int64)) for s in self.shards])

    def rows(self, block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded (ids, log-probs, tail) of every predicted position of these blocks, (B*(T-1), k) each
        ((B*(T-1), k + tail_draws) for a cache with tail draws, see :func:`decode_rows`)."""
        out = []
        for index in block_indices.tolist():
            shard = int(np.searchsorted(self._starts, index, side="right") - 1)
            local = index - int(self._starts[shard])
            rows = np.arange(local * self.rows_per_block, (local + 1) * self.rows_per_block)
            out.append(decode_rows(self.shards[shard], rows, self.meta.top_k, self.meta.logprob_format,
                                   self._offsets[shard], self.meta.tail_draws))
        return tuple(torch.cat(parts) for parts in zip(*out))

    def hidden_rows(self, block_indices: torch.Tensor, layer: int) -> torch.Tensor:
        """Teacher layer ``layer``'s hidden states at every predicted position of these blocks, (B*(T-1), H)."""
        if layer not in self.meta.hidden_layers:
            raise TeacherCacheError(f"{self.path} holds no hidden states of teacher layer {layer} (it has "
                                    f"{self.meta.hidden_layers or 'none'})")
        out = []
        for index in block_indices.tolist():
            shard = int(np.searchsorted(self._starts, index, side="right") - 1)
            start = (index - int(self._starts[shard])) * self.rows_per_block
            out.append(self._hidden[shard].get_slice(f"layer_{layer}")[start:start + self.rows_per_block])
        return torch.cat(out)

    def hidden_layer_map(self, layer_map, student_layers: int) -> dict[int, int]:
        """``DistillationConfig.layer_map`` resolved against the student's depth and the cached teacher's
        (:func:`.hidden.resolve_layer_map`), refused unless the cache holds every mapped teacher layer."""
        from .hidden import resolve_layer_map

        meta, where = self.meta, str(self.path)
        if not meta.hidden_layers:
            raise TeacherCacheError(f"{where} holds no hidden states, but the run distils them (hidden_weight > 0); "
                                    f"rewrite the cache with `hfcompress cache-teacher --hidden-layers ...` or set "
                                    f"hidden_weight=0")
        resolved = resolve_layer_map(layer_map, student_layers, meta.teacher_num_layers)
        needed = sorted(set(resolved.values()))
        missing = sorted(set(needed) - set(meta.hidden_layers))
        if missing:
            raise TeacherCacheError(f"layer_map {resolved} needs teacher layers {missing}, but {where} holds hidden "
                                    f"states of layers {meta.hidden_layers} only; set layer_map to map onto those "
                                    f"(e.g. '{{\"{student_layers - 1}\": {meta.hidden_layers[-1]}}}') or rewrite "
                                    f"the cache with --hidden-layers {' '.join(map(str, needed))}")
        return resolved

    def check(self, *, tokenizer=None, temperature: float | None = None, top_k: int | None = None,
              teacher: str | None = None, teacher_hash: str | None = None, vocab_size: int | None = None) -> None:
        """Refuse a cache that does not match the run (each check only when the run states the value)."""
        meta, where = self.meta, str(self.path)
        if temperature is not None and not math.isclose(temperature, meta.temperature):
            raise TeacherCacheError(f"{where} was written at temperature {meta.temperature}, but the run uses "
                                    f"temperature={temperature}; set temperature={meta.temperature} or rewrite the "
                                    f"cache with --temperature {temperature}")
        if top_k is not None and top_k != meta.top_k:
            raise TeacherCacheError(f"{where} holds the top {meta.top_k} tokens per position, but the run asks for "
                                    f"cache_top_k={top_k}; rewrite the cache with --top-k {top_k}")
        if tokenizer is not None and meta.tokenizer_hash and tokenizer_hash(tokenizer) != meta.tokenizer_hash:
            raise TeacherCacheError(f"{where} was written with another tokenizer (hash {meta.tokenizer_hash}, the "
                                    f"run's is {tokenizer_hash(tokenizer)}); its token ids mean other tokens here")
        if teacher is not None and teacher != meta.teacher:
            raise TeacherCacheError(f"{where} holds the outputs of teacher {meta.teacher!r}, not {teacher!r}; "
                                    f"write a cache of {teacher!r} or drop the teacher argument")
        if teacher_hash is not None and teacher_hash != meta.teacher_hash:
            raise TeacherCacheError(f"{where} was written by a teacher with other weights (hash "
                                    f"{meta.teacher_hash}, this one's is {teacher_hash}); rewrite the cache")
        if vocab_size is not None and vocab_size < meta.vocab_size:
            raise TeacherCacheError(f"{where} covers {meta.vocab_size} token ids but the student has only "
                                    f"{vocab_size} output rows; use a student with the teacher's vocabulary")


class CacheDataset(torch.utils.data.Dataset):
    """The cache's training blocks, each with its ``cache_index`` (the rows of the teacher signal)."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        ids = self.cache.block(index)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                "cache_index": torch.tensor(index)}


@torch.no_grad()
def approximation_error(cache: TeacherCache, teacher, student, num_blocks: int = 4) -> dict:
    """How far the cached top-k + tail loss is from the full live-teacher forward KL, for ``student``, on the
    cache's first ``num_blocks`` blocks: mean full KL, mean bucket KL, and their relative gap. For a cache with
    tail draws the bucket KL is its top-k + tail part's (what the draws estimate without bias is the gap)."""
    t = cache.meta.temperature
    indices = torch.arange(min(num_blocks, len(cache)))
    blocks = torch.stack([cache.block(i) for i in indices.tolist()])
    vocab = cache.meta.vocab_size
    s = F.log_softmax(student(input_ids=blocks).logits[:, :-1, :vocab].float() / t, -1).reshape(-1, vocab)
    p = F.log_softmax(teacher(input_ids=blocks).logits[:, :-1, :vocab].float() / t, -1).reshape(-1, vocab)
    full = F.kl_div(s, p, reduction="none", log_target=True).sum(-1).mean().item()
    ids, logp, tail = cache.rows(indices)
    k = cache.meta.top_k
    if cache.meta.tail_draws:  # the drawn ids' shares sum to the stored tail mass
        ids, logp, tail = ids[:, :k], logp[:, :k], logp[:, k:].logsumexp(-1)
    student_b, teacher_b = bucket_logprobs(s, ids, logp, tail, vocab)
    bucket = F.kl_div(student_b, teacher_b, reduction="none", log_target=True).sum(-1).mean().item()
    return {"full_kl": full, "bucket_kl": bucket, "relative_gap": (full - bucket) / max(full, 1e-12)}
