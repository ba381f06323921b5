"""Layer-by-layer calibration internals: shared input statistics, stacked GPTQ, cached dequantization."""

import copy

import torch
from torch import nn

from hfcompress.quantization import calibrate as C
from hfcompress.quantization import primitives as P
from hfcompress.quantization.api import Target, quantize_gptq
from hfcompress.quantization.config import QuantizationConfig
from hfcompress.quantization.gptq import gptq_quantize
from hfcompress.quantization.modules import CompressedLinear, dequantized_weights_cached


def _layer_inputs(model, ids):
    return C.capture_first_layer_inputs(model, model.model.layers[0], ids, batch_size=4)


def _linears(layer, prefix="model.layers.0"):
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def test_linears_fed_the_same_tensor_share_one_statistics_object(tiny_llama, calibration_ids):
    layer = tiny_llama.model.layers[0]
    inputs = _layer_inputs(tiny_llama, calibration_ids)
    modules = _linears(layer)
    shared = C.collect_stats(layer, modules, inputs)
    separate = C.collect_stats(layer, modules, inputs, share=False)
    p = "model.layers.0."
    assert shared[p + "self_attn.q_proj"] is shared[p + "self_attn.k_proj"] is shared[p + "self_attn.v_proj"]
    assert shared[p + "mlp.gate_proj"] is shared[p + "mlp.up_proj"]
    assert len({id(s) for s in shared.values()}) == 4  # qkv, o, gate/up, down
    assert len({id(s) for s in separate.values()}) == len(modules)
    for name in modules:  # sharing changes nothing but the bookkeeping
        torch.testing.assert_close(shared[name].hessian, separate[name].hessian, rtol=0, atol=0)
        torch.testing.assert_close(shared[name].abs_mean, separate[name].abs_mean, rtol=0, atol=0)
        assert shared[name].count == separate[name].count == calibration_ids.numel()


def test_statistics_match_a_direct_computation(tiny_llama, calibration_ids):
    layer = tiny_llama.model.layers[0]
    inputs = _layer_inputs(tiny_llama, calibration_ids)
    name = "model.layers.0.self_attn.q_proj"
    stats = C.collect_stats(layer, {name: layer.self_attn.q_proj}, inputs)[name]
    with torch.no_grad():
        rows = torch.cat([layer.input_layernorm(args[0]).reshape(-1, args[0].shape[-1]) for args in inputs.args])
    torch.testing.assert_close(stats.hessian, rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.abs_mean, rows.abs().mean(0), rtol=1e-5, atol=1e-7)


def test_inputs_that_stop_being_shared_fall_back_to_separate_statistics():
    xs = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            y = x if x is xs[0] else x * 2  # b gets a's very tensor on the first batch only
            return self.a(x) + self.b(y)

    block = Block()
    inputs = C.LayerInputs(args=[(x,) for x in xs], kwargs=[{} for _ in xs])
    stats = C.collect_stats(block, {"a": block.a, "b": block.b}, inputs)
    assert stats["a"] is not stats["b"]
    for name, rows in (("a", torch.cat(xs)), ("b", torch.cat([xs[0]] + [2 * x for x in xs[1:]]))):
        torch.testing.assert_close(stats[name].hessian, rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


def test_stacked_gptq_gives_each_linear_the_codes_it_gets_alone():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=gen) @ (torch.eye(32) + 0.3 * torch.randn(32, 32, generator=gen))
    stats = C.InputStats(x.t() @ x / 300, x.abs().mean(0), 300)
    linears = {n: nn.Linear(32, out, bias=False) for n, out in (("q", 16), ("k", 8), ("v", 8))}
    targets = {n: Target(n, m, 16, stats) for n, m in linears.items()}
    config = QuantizationConfig(method="gptq", bits=3, group_size=16, act_order=False)
    stacked = quantize_gptq(None, "", targets, config, torch.Generator())
    for name, module in linears.items():
        codes, scale, _ = gptq_quantize(module.weight.detach(), stats.hessian, 3, 16, damp=config.damp,
                                        block_size=config.block_size, static_groups=config.static_groups)
        # Row-independent in exact arithmetic; float32 sums may differ in order with the stacked shapes.
        mismatch = (stacked[name].codes != codes).float().mean().item()
        assert mismatch < 0.01, name
        torch.testing.assert_close(stacked[name].scale, scale, rtol=1e-5, atol=1e-7)


def test_cached_dequantized_weights_give_the_same_outputs_and_are_dropped_after():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 32, generator=gen)
    scale, zero_point = P.compute_qparams(w, 4, 16, symmetric=False)
    codes = P.quantize(w, scale, zero_point, 4, 16)
    module = CompressedLinear.from_codes(codes, scale, zero_point, 4, 16)
    root = nn.Sequential(copy.deepcopy(module))
    x = torch.randn(5, 32, generator=gen)
    expected = root(x)
    with dequantized_weights_cached(root):
        assert root[0]._cached_weight is not None
        torch.testing.assert_close(root(x), expected, rtol=0, atol=0)
    assert root[0]._cached_weight is None
    torch.testing.assert_close(root(x), expected, rtol=0, atol=0)
