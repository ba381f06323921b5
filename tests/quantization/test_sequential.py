"""GPTQ in one forward pass per decoder layer (``true_sequential=True``, :mod:`hfcompress.quantization.sequential`)."""

import copy
import logging

import pytest
import torch
from torch import nn

from hfcompress import QuantizationConfig, quantize
from hfcompress.quantization import calibrate as C
from hfcompress.quantization import primitives as P
from hfcompress.quantization import sequential as S
from hfcompress.quantization.gptq import gptq_quantize

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _llama(dtype=torch.float32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def _ids(n=12, t=24, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(**kwargs):
    defaults = dict(method="gptq", bits=3, group_size=32, num_samples=12, seq_len=24, act_order=False)
    defaults.update(kwargs)
    return QuantizationConfig(**defaults)


def _codes(model) -> dict[str, torch.Tensor]:
    return {name: module.codes() for name, module in model.named_modules() if hasattr(module, "codes")}


@torch.no_grad()
def _group_by_group_reference(model, ids, config) -> dict[str, torch.Tensor]:
    """The definition of the true-sequential order, with one forward pass per group of linears: each group's
    Hessian comes from inputs computed with every earlier group of the layer already quantized."""
    layers = C.find_sequential_layers(model, None, {n for n, m in model.named_modules() if C.is_linear(m)})
    inputs = C.capture_first_layer_inputs(model, layers[0][1], ids)
    expected = {}
    for layer_name, layer in layers:
        for group in GROUPS:
            modules = {n: layer.get_submodule(n) for n in group}
            stats = C.collect_stats(layer, modules, inputs)
            for name, module in modules.items():
                codes, scale, zero = gptq_quantize(module.weight, stats[name].hessian, config.bits, config.group_size,
                                                   damp=config.damp, block_size=config.block_size,
                                                   act_order=config.act_order, static_groups=config.static_groups)
                expected[f"{layer_name}.{name}"] = codes
                module.weight.copy_(P.dequantize(codes, scale, zero, config.group_size))
        C.propagate(layer, inputs)
    return expected


@pytest.mark.parametrize("act_order", [False, True])
def test_one_pass_gives_the_codes_of_the_group_by_group_definition(act_order):
    # float64: stacked (q/k/v together) and separate GPTQ sweeps then agree to the last code
    model = _llama(torch.float64)
    reference = copy.deepcopy(model)
    config = _config(act_order=act_order)
    quantize(model, config, calibration_data=_ids(), progress=False)
    assert model.hfcompress_report.true_sequential
    assert model.config.hfcompress["true_sequential"] is True
    expected = _group_by_group_reference(reference, _ids(), config)
    got = _codes(model)
    assert set(got) == set(expected) and len(got) == 14
    for name, codes in expected.items():
        assert torch.equal(got[name], codes), name


def test_two_pass_order_takes_every_hessian_from_the_floating_point_layer():
    one, two = _llama(), _llama()
    quantize(one, _config(), calibration_data=_ids(), progress=False)
    quantize(two, _config(true_sequential=False), calibration_data=_ids(), progress=False)
    assert not two.hfcompress_report.true_sequential
    a, b = _codes(one), _codes(two)
    # The first group of the first layer reads the same inputs in both orders; o_proj does not (it sees the
    # attention of quantized q/k/v in one order, of the float ones in the other).
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(a[f"model.layers.0.self_attn.{name}"], b[f"model.layers.0.self_attn.{name}"])
    assert not torch.equal(a["model.layers.0.self_attn.o_proj"], b["model.layers.0.self_attn.o_proj"])


def test_both_orders_close_most_of_rtns_gap_on_a_trained_model(tiny_reference_dir, calibration_ids, eval_ids):
    from transformers import AutoModelForCausalLM

    from hfcompress.models.evaluate import perplexity

    base = perplexity(AutoModelForCausalLM.from_pretrained(tiny_reference_dir), eval_ids)
    gaps = {}
    for method, true_sequential in (("rtn", True), ("gptq", True), ("gptq", False)):
        model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
        quantize(model, QuantizationConfig(method=method, bits=3, group_size=32, num_samples=16, seq_len=64,
                                           true_sequential=true_sequential),
                 calibration_data=calibration_ids, progress=False)
        gaps[method, true_sequential] = perplexity(model, eval_ids) - base
    # Each GPTQ order beats 3-bit RTN on this model (by 12-37% of RTN's gap on the teachers measured). Which
    # order is better is not a property of the algorithm at this size: over freshly trained tiny teachers (their
    # training is not bit-reproducible across runs) and calibration draws, the one-pass (true-sequential) gap
    # measured 0.6x-1.7x the two-pass one (session 9), so the test does not rank them; scripts/bench compares the
    # orders on the larger teachers.
    for order in (True, False):
        assert gaps["gptq", order] < gaps["rtn", True], gaps


def test_same_seed_same_bytes_in_one_pass():
    first, second = _llama(), _llama()
    for model in (first, second):
        quantize(model, _config(), calibration_data=_ids(), progress=False)
    for name, codes in _codes(first).items():
        assert torch.equal(codes, _codes(second)[name])


def test_not_enough_free_memory_falls_back_to_two_passes_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(S, "free_bytes", lambda device: 1024)
    model, two = _llama(), _llama()
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.sequential"):
        quantize(model, _config(), calibration_data=_ids(), progress=False)
    assert "running two passes per layer instead" in caplog.text and "true_sequential=False" in caplog.text
    assert not model.hfcompress_report.true_sequential
    quantize(two, _config(true_sequential=False), calibration_data=_ids(), progress=False)
    for name, codes in _codes(two).items():
        assert torch.equal(_codes(model)[name], codes)


def test_in_flight_estimate_scales_with_the_batches_and_the_widest_input():
    hidden = [torch.zeros(2, 8, 16) for _ in range(3)]  # 3 batches of 2x8 tokens, width 16
    inputs = C.LayerInputs(args=[(h,) for h in hidden], kwargs=[{} for _ in hidden])
    narrow = {"a": nn.Linear(16, 16)}
    wide = {"a": nn.Linear(16, 16), "b": nn.Linear(64, 16)}
    cache = 3 * 2 * 8 * 16 * 4
    assert S.in_flight_bytes(inputs, narrow) == int(cache * (S.IN_FLIGHT_FACTOR + 2))
    assert S.in_flight_bytes(inputs, wide) == int(cache * (S.IN_FLIGHT_FACTOR + 2 * 4))


class _Block(nn.Module):
    """a -> b (b reads a's input unless ``detach_b``), then c; ``unused`` is never called."""

    def __init__(self, detach_b=False, fail_on=None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.unused = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.detach_b, self.fail_on = detach_b, fail_on

    def forward(self, x):
        if self.fail_on is not None and x[0, 0].item() == self.fail_on:
            raise ValueError("this batch is bad")
        h = self.a(x) + self.b(x.clone() if self.detach_b else x)
        return self.c(torch.relu(h))


def _batches(n=3):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, generator=gen) for _ in range(n)]
    return C.LayerInputs(args=[(x,) for x in xs], kwargs=[{} for _ in xs])


def _rounding_callback(block, calls):
    def quantize_group(names, stats):
        calls.append((tuple(names), stats))
        for name in names:
            weight = block.get_submodule(name).weight
            weight.copy_(weight.round())
    return quantize_group


def test_the_scheduler_quantizes_in_call_order_shares_statistics_and_propagates():
    block, inputs = _Block(), _batches()
    xs = [args[0] for args in inputs.args]
    targets = {n: block.get_submodule(n) for n in ("a", "b", "c", "unused")}
    original = copy.deepcopy(block)
    calls = []
    missed = S.quantize_layer_in_one_pass(block, inputs, targets, _rounding_callback(block, calls))
    assert missed == ["unused"]
    assert [names for names, _ in calls] == [("a",), ("b",), ("c",)]
    assert calls[0][1] is calls[1][1]  # b read a's very input tensor: one statistics object
    rows = torch.cat(xs)
    torch.testing.assert_close(calls[0][1].hessian, rows.t() @ rows / rows.shape[0])
    # c's statistics come from the outputs of the rounded a and b
    with torch.no_grad():
        for module in (original.a, original.b):
            module.weight.copy_(module.weight.round())
        hidden = torch.relu(torch.cat([original.a(x) + original.b(x) for x in xs]))
        torch.testing.assert_close(calls[2][1].hessian, hidden.t() @ hidden / hidden.shape[0])
        assert not any(m._forward_pre_hooks for m in block.modules())
        for x, args in zip(xs, inputs.args):  # the outputs replaced the inputs, computed with every weight rounded
            torch.testing.assert_close(args[0], block(x))


def test_a_sharing_plan_quantizes_followers_with_their_leader_and_is_dropped_when_contradicted(caplog):
    plan = S.SharingPlan()
    first, calls = _Block(), []
    S.quantize_layer_in_one_pass(first, _batches(), {"a": first.a, "b": first.b}, _rounding_callback(first, calls),
                                 plan)
    assert [names for names, _ in calls] == [("a",), ("b",)]
    assert plan.followers == {("_Block", "a"): ["b"]}
    second, calls = _Block(), []
    S.quantize_layer_in_one_pass(second, _batches(), {"a": second.a, "b": second.b},
                                 _rounding_callback(second, calls), plan)
    assert [names for names, _ in calls] == [("a", "b")]  # one call: the plan groups them
    third, calls = _Block(detach_b=True), []
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.sequential"):
        S.quantize_layer_in_one_pass(third, _batches(), {"a": third.a, "b": third.b},
                                     _rounding_callback(third, calls), plan)
    assert "did not read the same input" in caplog.text
    assert plan.followers == {}


def test_an_error_inside_the_layer_propagates_and_leaves_no_hook_or_running_batch():
    inputs = _batches()
    bad = inputs.args[1][0][0, 0].item()
    block = _Block(fail_on=bad)
    with pytest.raises(ValueError, match="this batch is bad"):
        S.quantize_layer_in_one_pass(block, inputs, {"a": block.a, "c": block.c}, _rounding_callback(block, []))
    assert not any(m._forward_pre_hooks for m in block.modules())


def test_a_linear_no_batch_reaches_is_quantized_with_rtn_and_named(caplog):
    model = _llama()
    for layer in model.model.layers:
        layer.mlp.spare = nn.Linear(64, 64)  # inside the decoder layer, never called
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.api"):
        quantize(model, _config(), calibration_data=_ids(), progress=False)
    assert "no calibration batch reached model.layers.0.mlp.spare" in caplog.text
    spare = {layer.name: layer for layer in model.hfcompress_report.layers}["model.layers.1.mlp.spare"]
    assert spare.metric == "weight"
    assert type(model.model.layers[1].mlp.spare).__name__ == "CompressedLinear"
