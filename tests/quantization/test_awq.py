import copy
import math

import pytest
import torch

from hfcompress.quantization import awq as A
from hfcompress.quantization import calibrate as C
from hfcompress.quantization import primitives as P


def test_scale_search_is_never_worse_than_plain_quantization():
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.ones(64)
    magnitude[:4] = 20.0  # a few salient channels, as AWQ observes in LLMs
    x = torch.randn(512, 64, generator=gen) * magnitude
    hessian = x.t() @ x / 512
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)]
    scale, alpha = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True)
    assert alpha > 0 and scale.shape == (64,)
    assert scale[:4].min() > scale[4:].max()  # salient channels are scaled up

    def error(s):
        return sum(P.output_error(w - P.fake_quantize(w * s, 3, 16, True) / s, hessian) for w in weights)

    assert error(scale) < 0.9 * error(torch.ones(64))


def test_folding_keeps_a_llama_layer_function(tiny_llama):
    layer = tiny_llama.model.layers[0]
    mappings = A.layer_mappings(layer, {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
    names = [prev for prev, _ in mappings]
    # v_proj -> o_proj is skipped: with grouped-query attention their widths differ.
    assert names == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16))
    before = tiny_llama(ids).logits
    modules = dict(layer.named_modules())
    for prev, linears in mappings:
        scale = torch.rand(modules[linears[0]].in_features) + 0.5
        A.scale_inputs([modules[n] for n in linears], scale)
        A.divide_output(modules[prev], scale)
    torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_folding_into_gpt2_layernorm_and_conv1d(tiny_gpt2):
    block = tiny_gpt2.transformer.h[0]
    mappings = A.layer_mappings(block, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})
    assert [prev for prev, _ in mappings] == ["ln_1", "ln_2"]
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 16))
    before = tiny_gpt2(ids).logits
    modules = dict(block.named_modules())
    for prev, linears in mappings:
        scale = torch.rand(64) + 0.5
        A.scale_inputs([modules[n] for n in linears], scale)
        A.divide_output(modules[prev], scale)
    torch.testing.assert_close(tiny_gpt2(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_gemma_style_norms_fold_through_their_offset():
    """Gemma's RMSNorm computes normalized * (1 + weight): dividing its output by s sets 1 + w' = (1 + w) / s."""
    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8) * 0.1)

        def forward(self, x):
            return x * (1 + self.weight)

    norm, x = GemmaRMSNorm(), torch.randn(3, 8)
    before = norm(x).detach()
    scale = torch.rand(8) + 0.5
    assert A.output_channels(norm) == 8 and A.output_channels(torch.nn.LayerNorm(8)) == 8
    A.divide_output(norm, scale)
    torch.testing.assert_close(norm(x) * scale, before)
    A.divide_output(norm, 1.0 / scale)  # undoing a fold restores the norm
    torch.testing.assert_close(norm(x), before)


def test_scale_candidates_match_a_float64_reference():
    abs_mean = torch.rand(48, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    abs_mean[3] = 0.0  # a dead channel: clamped, not 0 ** alpha
    candidates = list(A.scale_candidates(abs_mean.float(), grid=8))
    assert [alpha for alpha, _ in candidates] == [i / 8 for i in range(8)]
    torch.testing.assert_close(candidates[0][1], torch.ones(48), rtol=0, atol=0)  # alpha 0: plain quantization
    for alpha, s in candidates:
        ref = abs_mean.pow(alpha).clamp(min=1e-4)
        ref = ref / (ref.max() * ref.min()).sqrt()
        torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=0)
        assert math.isclose(s.max().item() * s.min().item(), 1.0, rel_tol=1e-5)


def test_scale_search_takes_any_objective_and_is_never_worse_than_alpha_zero():
    gen = torch.Generator().manual_seed(2)
    magnitude = torch.ones(64)
    magnitude[:4] = 20.0
    x = torch.randn(512, 64, generator=gen) * magnitude
    hessian = x.t() @ x / 512
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)]
    calls = []

    def hessian_error(approx):  # the default objective, written out
        calls.append(approx)
        return sum(P.output_error(w - a, hessian).item() for w, a in zip(weights, approx))

    default = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True)
    explicit = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True, error=hessian_error)
    assert default[1] == explicit[1] and torch.equal(default[0], explicit[0])
    assert len(calls) == A.AWQ_GRID and [a.shape for a in calls[0]] == [(32, 64), (16, 64)]
    # approx = Q(W s) / s with s the candidate's scale
    alpha, s = list(A.scale_candidates(x.abs().mean(0)))[5]
    torch.testing.assert_close(calls[5][0], P.fake_quantize(weights[0] * s, 3, 16, True) / s)

    # A flat objective (every candidate ties) keeps alpha 0: s = 1.
    scale, alpha = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True, error=lambda approx: 1.0)
    assert alpha == 0 and torch.equal(scale, torch.ones(64))
    # Whatever the objective, the chosen candidate's error is the minimum over the grid, alpha 0 included.
    seen = {}

    def weighted(approx):
        err = sum(((w - a) ** 2 * torch.linspace(0.1, 3, 64)).sum().item() for w, a in zip(weights, approx))
        seen[len(seen)] = err
        return err

    scale, alpha = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True, error=weighted)
    assert seen[round(alpha * A.AWQ_GRID)] == min(seen.values()) <= seen[0]


def test_common_parent():
    assert A.common_parent(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) == "self_attn"
    assert A.common_parent(("mlp.gate_proj", "mlp.up_proj")) == "mlp"
    assert A.common_parent(("mlp.down_proj",)) == "mlp.down_proj"
    assert A.common_parent(("attn.c_attn", "mlp.c_fc")) == ""
    assert A.common_parent(("block.a.x", "block.b.x")) == "block"


def _first_layer_inputs(model, ids):
    return C.capture_first_layer_inputs(model, model.model.layers[0], ids, batch_size=4)


def test_captured_module_calls_replay_the_module(tiny_llama, calibration_ids):
    layer = tiny_llama.model.layers[0]
    inputs = _first_layer_inputs(tiny_llama, calibration_ids)  # 16 sequences, 4 batches
    ran_mlp = []
    handle = layer.mlp.register_forward_pre_hook(lambda mod, args: ran_mlp.append(1))
    try:
        calls = C.capture_module_calls(layer, layer.self_attn, inputs, max_tokens=6 * 64)
    finally:
        handle.remove()
    # 2 batches of 4 x 64 tokens reach 6 x 64 tokens; each stops after self_attn
    assert len(calls) == 2 and not ran_mlp
    with torch.no_grad():
        for call in calls:
            torch.testing.assert_close(C.layer_output(layer.self_attn(*call.args, **call.kwargs)), call.output,
                                       rtol=0, atol=0)
        # All batches by default; the MLP gets what it gets in a plain run of the layer.
        calls = C.capture_module_calls(layer, layer.mlp, inputs)
        assert len(calls) == 4
        seen = []
        handle = layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            C.run_first_batch(layer, inputs)
        finally:
            handle.remove()
        torch.testing.assert_close(calls[0].args[0], seen[0], rtol=0, atol=0)
        # The layer itself can be the module.
        whole = C.capture_module_calls(layer, layer, inputs, max_tokens=4 * 64)
        assert len(whole) == 1
        torch.testing.assert_close(whole[0].output, C.run_first_batch(layer, inputs), rtol=0, atol=0)
    probe = C.LayerProbe(layer, inputs)
    assert probe.inputs is inputs and torch.equal(probe(), whole[0].output)


def test_search_budget_counts_tokens_not_sequences(tiny_llama):
    """The block re-runs of a scale search cost per token: the same AWQ_SEARCH_TOKENS budget takes half as
    many sequences when they are twice as long (whole batches, so at least one)."""
    layer = tiny_llama.model.layers[0]
    width = tiny_llama.config.hidden_size
    for seq_len, expected_batches in ((8, 4), (16, 2), (32, 1), (128, 1)):  # 4 x seq_len tokens a batch
        hidden = torch.randn(4, seq_len, width)  # 4 batches of 4 sequences
        position = torch.arange(seq_len).unsqueeze(0)
        rotary = tiny_llama.model.rotary_emb(hidden, position)
        inputs = C.LayerInputs(args=[(hidden,)] * 4, kwargs=[{"position_embeddings": rotary,
                                                               "attention_mask": None}] * 4)
        assert C.batch_tokens((hidden,), {}) == 4 * seq_len
        assert C.batch_tokens((), {"hidden_states": hidden}) == 4 * seq_len
        calls = C.capture_module_calls(layer, layer.mlp, inputs, max_tokens=128)
        assert len(calls) == expected_batches, seq_len
    assert A.AWQ_SEARCH_TOKENS == 32 * 256  # the 32 sequences of 256 tokens the setting was chosen on


def test_block_error_measures_the_block_output_and_restores_the_weights(tiny_llama, calibration_ids):
    layer = tiny_llama.model.layers[0]
    inputs = _first_layer_inputs(tiny_llama, calibration_ids)
    linears = [layer.mlp.gate_proj, layer.mlp.up_proj]
    originals = [m.weight.detach().clone() for m in linears]
    calls = C.capture_module_calls(layer, layer.mlp, inputs)
    error = A.block_error(layer.mlp, linears, calls)
    assert error(originals) == 0.0
    approx = [P.fake_quantize(w, 2, 32, True) for w in originals]
    with torch.no_grad():
        expected = []
        for call in calls:
            x = call.args[0]
            out = layer.mlp.down_proj(torch.nn.functional.silu(x @ approx[0].t()) * (x @ approx[1].t()))
            expected.append((out - call.output).pow(2))
        expected = torch.cat([e.flatten() for e in expected]).mean().item()
    assert math.isclose(error(approx), expected, rel_tol=1e-4)
    for module, original in zip(linears, originals):
        assert torch.equal(module.weight, original)

    # Used as the search objective: never worse than plain quantization on the block output.
    stats = C.collect_stats(layer, {"g": layer.mlp.gate_proj, "u": layer.mlp.up_proj}, inputs)["g"]
    scale, alpha = A.search_scale(originals, stats.hessian, stats.abs_mean, 2, 32, True, error=error)
    plain = error([P.fake_quantize(w, 2, 32, True) for w in originals])
    assert error([P.fake_quantize(w * scale, 2, 32, True) / scale for w in originals]) <= plain
    assert (alpha == 0) == torch.equal(scale, torch.ones_like(scale))


def test_awq_measures_shared_input_mappings_at_the_block_output(tiny_llama, calibration_ids):
    from hfcompress.quantization.api import quantize
    from hfcompress.quantization.config import QuantizationConfig

    config = QuantizationConfig(method="awq", bits=2, group_size=32, num_samples=16, seq_len=64)
    quantize(tiny_llama, config, calibration_data=calibration_ids, progress=False)
    objectives = {layer.name.split(".", 3)[3]: layer.extra.get("awq_objective")
                  for layer in tiny_llama.hfcompress_report.layers if layer.extra}
    assert objectives  # 2 bits: some scales are folded
    for name, objective in objectives.items():
        assert objective == ("layer" if name in ("self_attn.o_proj", "mlp.down_proj") else "block"), name


def test_grid_and_clipping_settings_are_read_when_awq_runs(tiny_llama, calibration_ids, monkeypatch):
    """The defaults sweep (scripts/bench/defaults_sweep.py) changes AWQ_GRID / AWQ_CLIP at run time: both must
    take effect then, not at import."""
    from hfcompress.quantization.api import quantize
    from hfcompress.quantization.config import QuantizationConfig

    monkeypatch.setattr(A, "AWQ_GRID", 5)
    calls = []
    weights = [torch.randn(8, 32)]
    A.search_scale(weights, torch.eye(32), torch.rand(32) + 0.1, 3, 16, True,
                   error=lambda approx: calls.append(approx) or 1.0)
    assert len(calls) == 5 and [a for a, _ in A.scale_candidates(torch.rand(32))] == [0, 0.2, 0.4, 0.6, 0.8]

    clipped = []
    search_clip = P.search_clip
    monkeypatch.setattr(P, "search_clip", lambda *args, **kwargs: clipped.append(1) or search_clip(*args, **kwargs))
    config = QuantizationConfig(method="awq", bits=3, group_size=32, num_samples=4, seq_len=64)
    other = copy.deepcopy(tiny_llama)
    monkeypatch.setattr(A, "AWQ_CLIP", False)
    quantize(tiny_llama, config, calibration_data=calibration_ids[:4], progress=False)
    assert not clipped  # min-max scales after the fold
    monkeypatch.setattr(A, "AWQ_CLIP", True)
    quantize(other, config, calibration_data=calibration_ids[:4], progress=False)
    assert len(clipped) == 14  # 7 linears in each of the 2 layers
