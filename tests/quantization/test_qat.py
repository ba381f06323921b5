"""Quantization-aware training: STE gradients, exact fake-quant forward, LSQ scales, convert -> save -> load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hfcompress import QuantizationConfig, convert_qat, prepare_qat, quantize
from hfcompress.quantization import primitives as P
from hfcompress.quantization.config import QuantizationError
from hfcompress.quantization.modules import CompressedLinear
from hfcompress.quantization.qat import FakeQuantLinear, fake_quantize_ste, lsq_grad_scale
from hfcompress.core.errors import ConfigError


def _weight(out=6, inp=32, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [8, None])
def test_fake_quant_forward_is_dequantize_of_quantize_exactly(symmetric, group_size):
    weight = _weight()
    layer = FakeQuantLinear(weight, None, bits=4, group_size=group_size, symmetric=symmetric)
    expected = P.fake_quantize(weight, 4, group_size, symmetric)
    assert torch.equal(layer.quantized_weight(), expected)
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), nn.functional.linear(x, expected))


def test_ste_gradient_passes_inside_the_range_and_is_zero_outside():
    weight = _weight().requires_grad_(True)
    scale = P.compute_qparams(weight.detach(), 4, 8, True)[0] * 0.6  # shrunk: some weights fall outside
    upstream = torch.randn(6, 32)
    fake_quantize_ste(weight, scale, None, 4, 8).backward(upstream)
    codes = torch.round(P._grouped(weight.detach(), 8) / scale.unsqueeze(-1)).reshape(6, 32)
    inside = (codes >= -8) & (codes <= 7)
    assert 0 < (~inside).sum() < inside.sum()
    # (1/s) * s: equal to the upstream gradient up to one rounding; exactly 0 where clamped.
    assert torch.allclose(weight.grad, torch.where(inside, upstream, torch.zeros_like(upstream)), rtol=1e-6, atol=0)
    assert torch.all(weight.grad[~inside] == 0)


def test_lsq_scale_gradient_is_the_papers():
    # Esser et al. 2019, eq. 3: d w_hat / d s = round(v) - v inside, qmin/qmax outside; times g.
    weight = _weight(2, 8)
    scale = (P.compute_qparams(weight, 3, None, True)[0] * 0.7).requires_grad_(True)
    g = lsq_grad_scale(8, 3)
    fake_quantize_ste(weight, scale, None, 3, None, scale_grad=g).sum().backward()
    v = weight.double() / scale.detach().double()
    per_weight = torch.where(v.round() < -4, -4.0, torch.where(v.round() > 3, 3.0, v.round() - v))
    assert torch.allclose(scale.grad.double().squeeze(-1), g * per_weight.sum(-1), rtol=1e-5, atol=1e-6)
    assert g == pytest.approx(1 / (8 * 3) ** 0.5)


def _toy_train(model, blocks, steps=6, lr=3e-3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = blocks[(step % 2) * 4:(step % 2) * 4 + 4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_prepare_targets_like_quantize_and_qat_lowers_the_loss(tiny_teacher, calibration_ids):
    qat = prepare_qat(tiny_teacher, QuantizationConfig(bits=3, group_size=32))
    layers = {n: m for n, m in qat.named_modules() if isinstance(m, FakeQuantLinear)}
    assert layers and "lm_head" not in layers and isinstance(qat.lm_head, nn.Linear)
    blocks = calibration_ids[:8]
    with torch.no_grad():
        before = qat(input_ids=blocks, labels=blocks).loss.item()
    _toy_train(qat, blocks, steps=8)
    with torch.no_grad():
        after = qat(input_ids=blocks, labels=blocks).loss.item()
    assert after < before


def test_convert_equals_rtn_quantize_of_the_trained_weights(tiny_teacher, calibration_ids):
    config = QuantizationConfig(bits=4, group_size=32)
    qat = prepare_qat(tiny_teacher, config)
    _toy_train(qat, calibration_ids[:8], steps=3)
    # The trained float weights, as a plain model, quantized post-training with RTN.
    plain = copy.deepcopy(qat)
    for name, module in list(plain.named_modules()):
        if isinstance(module, FakeQuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.weight.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear)
    del plain.hfcompress_qat
    reference = quantize(plain, config, progress=False)
    with torch.no_grad():
        fake_logits = qat(calibration_ids[:2]).logits
    converted = convert_qat(qat)
    ours = {n: m for n, m in converted.named_modules() if isinstance(m, CompressedLinear)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, CompressedLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name].weight_packed, theirs[name].weight_packed), name
        assert torch.equal(ours[name].weight_scale, theirs[name].weight_scale), name
    assert converted.config.quantization_config == reference.config.quantization_config
    with torch.no_grad():  # the fake-quant model computed exactly what the converted one does
        assert torch.allclose(converted(calibration_ids[:2]).logits, fake_logits, atol=1e-5, rtol=1e-5)


def test_learned_scales_train_and_convert_with_them(tiny_teacher, calibration_ids):
    qat = prepare_qat(tiny_teacher, QuantizationConfig(bits=3, group_size=32), learn_scales=True)
    layer = qat.model.layers[0].mlp.down_proj
    initial = layer.scale.detach().clone()
    assert torch.equal(initial, layer.minmax_qparams()[0])  # LSQ starts from the RTN scales
    _toy_train(qat, calibration_ids[:8], steps=4, lr=1e-3)
    assert not torch.allclose(layer.scale.detach(), initial)
    learned = layer.scale.detach().clone()
    assert (learned > 0).all()
    with torch.no_grad():
        fake_logits = qat(calibration_ids[:2]).logits
    converted = convert_qat(qat)
    stored = converted.model.layers[0].mlp.down_proj.weight_scale
    assert torch.equal(stored, learned)
    with torch.no_grad():
        assert torch.allclose(converted(calibration_ids[:2]).logits, fake_logits, atol=1e-5, rtol=1e-5)
    assert converted.config.hfcompress["qat"] == {"learned_scales": True}


def test_converted_model_saves_and_loads_in_both_runtimes(tmp_path, tiny_teacher, calibration_ids):
    from transformers import AutoModelForCausalLM

    from hfcompress import load_compressed

    qat = prepare_qat(tiny_teacher, QuantizationConfig(bits=4, group_size=32, symmetric=False))
    _toy_train(qat, calibration_ids[:8], steps=2)
    converted = convert_qat(qat)
    converted.save_pretrained(tmp_path)
    ids = calibration_ids[:2]
    with torch.no_grad():
        expected = converted(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
        packed = load_compressed(tmp_path, dtype=torch.float32, progress=False)(ids).logits
    assert torch.allclose(loaded, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(packed.float(), expected, atol=2e-3, rtol=2e-3)


def test_errors(tiny_teacher, tiny_llama):
    with pytest.raises(QuantizationError, match="no FakeQuantLinear"):
        convert_qat(tiny_llama)
    with pytest.raises(ConfigError, match="method='rtn'"):
        prepare_qat(tiny_llama, QuantizationConfig(method="gptq"))
    with pytest.raises(ConfigError, match="observer"):
        prepare_qat(tiny_llama, QuantizationConfig(observer="mse", group_size=32))
    quantized = quantize(copy.deepcopy(tiny_teacher), QuantizationConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(QuantizationError, match="already quantized"):
        prepare_qat(quantized, QuantizationConfig(group_size=32))
    prepared = prepare_qat(tiny_llama, QuantizationConfig(group_size=32))
    with pytest.raises(QuantizationError, match="already prepared"):
        prepare_qat(prepared, QuantizationConfig(group_size=32))
