"""Fixtures for the packed runtime, saving and verify tests.

Test checkpoints are written with compressed-tensors' own API (``apply_quantization_config`` ->
min/max qparams from ``calculate_qparams`` -> ``ModelCompressor.compress_model`` -> ``save_pretrained`` ->
``update_config``), i.e. the same steps llm-compressor takes, so the format is the ecosystem's, not ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def small_llama(hidden=64, intermediate=160, layers=2, vocab=320, heads=4, kv_heads=2, tie=False, seed=0):
    """A random Llama whose Linear shapes exercise both kernels (N % 16 == 0) and odd-shape fallbacks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def write_ct_checkpoint(model, out_dir, num_bits=4, strategy="group", group_size=32, symmetric=True,
                        targets=("Linear",), ignore=("lm_head",), tokenizer=None, extra_groups=None) -> Path:
    """Quantize ``model`` (in place) with min/max scales and save it in compressed-tensors pack-quantized
    format. ``extra_groups`` = {group name: (targets, QuantizationArgs kwargs)} adds config groups listed
    before the main one (first match wins)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    groups = {}
    for name, (group_targets, kwargs) in (extra_groups or {}).items():
        groups[name] = QuantizationScheme(targets=list(group_targets), weights=QuantizationArgs(type="int", **kwargs))
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)
    groups["group_main"] = QuantizationScheme(targets=list(targets), weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=list(ignore)),
                              show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            w = module.weight.data.float()  # (N, K)
            margs = scheme.weights
            if margs.strategy == "group":
                wg = w.reshape(w.shape[0], -1, margs.group_size)  # (N, G, gs)
                lo, hi = wg.amin(-1), wg.amax(-1)
            elif margs.strategy == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                lo, hi = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero = calculate_qparams(lo, hi, margs)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_dequantized_reference(path, dtype=torch.float32):
    """transformers' own load of a compressed-tensors checkpoint, dequantized to float (the reference)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "you passed quantization_config ... attributes will be overwritten": intended
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def ct_reference_logits(written_model, tokens):
    """(float32, bfloat16) logits of the in-memory model ``write_ct_checkpoint`` compressed: its first
    forward decompresses every module with compressed-tensors' own code and that module's own scheme.

    Used where transformers' loader cannot be the reference: it dequantizes every module with the first
    config group's scheme (mixed precision) and cannot load quantized embeddings (transformers 5.24)."""
    import copy

    with torch.no_grad():
        reference = written_model(tokens).logits.float()
        bf16 = copy.deepcopy(written_model).to(torch.bfloat16)(tokens).logits.float()
    return reference, bf16


def run_clean_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no hfcompress import unless the code does it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture()
def llama():
    return small_llama()


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def integer_prefill_bound(x, w_abs, ab):
    """The error bound of the kernels' integer prefill (common.h's i16_gemm) for x (M, K) against weights of
    magnitude w_abs (N, K), float64: each x_k moves to d X_k with d = max_block |x| / 32767 per block of ab
    columns, by <= d (1/2 + 2^-9) + 2^-23 |x_k| (the float32 x / d before rounding); the integer sums are exact;
    the per-block conversion, scale product and FMA, and the sum over blocks round relatively by 2^-24 each."""
    x64 = x.double().abs()
    m, k = x64.shape
    blocks = -(-k // ab)
    d = torch.nn.functional.pad(x64, (0, blocks * ab - k)).reshape(m, blocks, ab).amax(-1) / 32767
    d_k = d.repeat_interleave(ab, dim=1)[:, :k]
    magnitude = x64 @ w_abs.t()
    return d_k @ w_abs.t() * (0.5 + 2.0 ** -9) + (2.0 ** -23 + (3 * blocks + 8) * 2.0 ** -24) * magnitude * 1.001


def integer_prefill_runs(isa, dtype) -> bool:
    """Whether a prefill (M >= 8) at this ISA level takes the integer GEMM (not bfloat16 tiles, not the portable
    path, not switched off by HFCOMPRESS_PREFILL=float)."""
    import os

    from hfcompress.core import native

    bf16_tiles = dtype == torch.bfloat16 and isa >= 2 and native.cpu_has_native_bf16()
    return isa >= 1 and not bf16_tiles and os.environ.get("HFCOMPRESS_PREFILL") != "float"
