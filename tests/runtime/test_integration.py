"""hfcompress's own writer (``quantize`` + ``save_checkpoint``) -> ``verify_checkpoint`` -> ``load_compressed``.

The in-memory quantized model (``CompressedLinear``, dequantizing like compressed-tensors) is the reference;
the tolerance is the same as in test_runtime: 3x the error of that model run in bfloat16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from .conftest import small_llama

from hfcompress.quantization.runtime import (
    DequantLinear,
    Int4PackedLinear,
    Int8PackedLinear,
    kernel_module,
    load_compressed,
)
from hfcompress.quantization.saving import save_checkpoint
from hfcompress.quantization.verify import verify_checkpoint

api = pytest.importorskip("hfcompress.quantization.api")
QuantizationConfig = pytest.importorskip("hfcompress.quantization.config").QuantizationConfig

TOKENS = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bits,group_size,symmetric,expected", [
    (4, 64, False, {"model.layers.0.mlp.up_proj": Int4PackedLinear,  # group 64
                    "model.layers.0.mlp.down_proj": Int4PackedLinear}),  # K=160: falls back to group 32
    (8, None, True, {"model.layers.0.mlp.up_proj": Int8PackedLinear}),
    (8, 32, False, {"model.layers.0.mlp.up_proj": DequantLinear}),
])
def test_hfcompress_writer_round_trip(tmp_path, bits, group_size, symmetric, expected):
    model = small_llama()
    quantized = api.quantize(model, QuantizationConfig(method="rtn", bits=bits, group_size=group_size,
                                                       symmetric=symmetric), progress=False)
    with torch.no_grad():
        reference = quantized(TOKENS).logits.float()
        bf16 = copy.deepcopy(quantized).to(torch.bfloat16)(TOKENS).logits.float()
    out = save_checkpoint(quantized, tmp_path / "ckpt")
    report = verify_checkpoint(out)
    assert report.ok, report.summary()
    ours = load_compressed(out, progress=False)
    for name, cls in expected.items():
        assert type(kernel_module(ours.get_submodule(name))) is cls, name
    with torch.no_grad():
        error = (ours(TOKENS).logits.float() - reference).abs().max()
    assert error <= 3 * (bf16 - reference).abs().max()


def test_quantize_dispatches_bnb(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = small_llama(hidden=128, intermediate=256)
    quantized = api.quantize(model, QuantizationConfig(method="bnb_nf4", bnb_compute_dtype="float32"))
    assert isinstance(quantized.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(quantized.lm_head) is torch.nn.Linear  # QuantizationConfig's default ignore=["lm_head"]
    out = save_checkpoint(quantized, tmp_path / "nf4")
    assert verify_checkpoint(out).ok
