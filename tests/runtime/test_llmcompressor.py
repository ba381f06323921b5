"""Checkpoints written by llm-compressor itself (tests/runtime/data, see its README) load in the packed
runtime and reproduce the logits llm-compressor computed: exactly up to float32 rounding with float32
activations, and within 3x the error of a bfloat16 run of the dequantized model with bfloat16 activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from .conftest import load_dequantized_reference
from safetensors.torch import load_file

from hfcompress.quantization.runtime import Int4PackedLinear, Int8PackedLinear, load_compressed
from hfcompress.quantization.verify import verify_checkpoint

DATA = Path(__file__).parent / "data"
CASES = {"llmcompressor-w4a16-asym-g64-rtn": Int4PackedLinear, "llmcompressor-w8a16-channel-rtn": Int8PackedLinear}


@pytest.mark.parametrize("name", sorted(CASES))
def test_llmcompressor_checkpoint(name):
    path = DATA / name
    expected = load_file(path / "expected_logits.safetensors")
    tokens, reference = expected["input_ids"], expected["logits"].float()
    assert verify_checkpoint(path).ok

    exact = load_compressed(path, dtype=torch.float32, progress=False)
    assert isinstance(exact.model.layers[0].mlp.down_proj, CASES[name])
    with torch.no_grad():
        error32 = (exact(tokens).logits - reference).abs().max()
    # float32 activations: only summation order differs from llm-compressor's dequantized matmuls
    assert error32 <= 1e-5 * reference.abs().max() * 10

    fast = load_compressed(path, progress=False)  # bfloat16 activations
    with torch.no_grad():
        error16 = (fast(tokens).logits.float() - reference).abs().max()
        bf16_reference = load_dequantized_reference(path, torch.bfloat16)(tokens).logits.float()
    assert error16 <= 3 * (bf16_reference - reference).abs().max()
    out = fast.generate(tokens[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
