"""A failure in the middle of quantization never leaves a half-quantized model that saves quietly: the
original weights are put back (bit for bit, also those GPTQ's one pass and AWQ edit in place), or, when
holding them would not fit in memory, the model is marked so that saving it raises with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hfcompress.quantization import api
from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig
from hfcompress.quantization.rollback import IncompleteQuantizationError
from hfcompress.quantization.saving import save_checkpoint

IDS = torch.randint(0, 500, (8, 32), generator=torch.Generator().manual_seed(0))


class Boom(RuntimeError):
    pass


def _raise_on_call(monkeypatch, owner, name, at, item=False):
    """Make ``owner.name`` (or ``owner[name]``) raise :class:`Boom` on its ``at``-th call."""
    real = owner[name] if item else getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise Boom(f"injected failure at call {at}")
        return real(*args, **kwargs)

    if item:
        monkeypatch.setitem(owner, name, wrapper)
    else:
        monkeypatch.setattr(owner, name, wrapper)


def _assert_restored(model, original):
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    state, expected = model.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert state[key].dtype == expected[key].dtype and torch.equal(state[key], expected[key]), key
    assert getattr(model.config, "quantization_config", None) is None
    assert not hasattr(model.config, "hfcompress") and not hasattr(model, "hfcompress_report")
    assert not hasattr(model, "hfcompress_incomplete")
    assert not model.training  # eval() as before


# case -> (config, calibration data, what fails, on which call): always in the 2nd decoder layer, after the
# 1st was replaced. RTN without data and bitsandbytes: one call per linear (7 per layer). GPTQ's one pass:
# one call per group of linears: q, k, v, o, gate, up, down on the 1st layer; then q/k/v together, so call 9
# fails o_proj of the 2nd layer after q/k/v were quantized and written into their float weights in place.
# The others: one call per layer (AWQ has folded scales into the layer's norms and linears by then).
CASES = {
    "rtn": (dict(method="rtn", bits=4, group_size=32), None, "rtn_weight", 9),
    "rtn_mse": (dict(method="rtn", bits=4, group_size=32, observer="mse", num_samples=8, seq_len=32), IDS,
                "rtn", 2),
    "gptq_one_pass": (dict(method="gptq", bits=4, group_size=32, num_samples=8, seq_len=32), IDS, "gptq", 9),
    "gptq_two_pass": (dict(method="gptq", bits=4, group_size=32, num_samples=8, seq_len=32,
                           true_sequential=False), IDS, "gptq", 2),
    "awq": (dict(method="awq", bits=4, group_size=32, num_samples=8, seq_len=32), IDS, "awq", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_failure_restores_the_float_model(case, tiny_llama, monkeypatch, tmp_path):
    fields, data, where, at = CASES[case]
    original = copy.deepcopy(tiny_llama)
    if where in api.METHODS:  # the method's handler, called once per decoder layer (per group of linears)
        _raise_on_call(monkeypatch, api.METHODS, where, at, item=True)
    else:  # RTN without calibration data: one call per linear
        _raise_on_call(monkeypatch, api, where, at)
    with pytest.raises(Boom):
        quantize(tiny_llama, QuantizationConfig(**fields), calibration_data=data, progress=False)
    _assert_restored(tiny_llama, original)
    save_checkpoint(tiny_llama, tmp_path / "out")  # a plain float checkpoint again, saved without complaint
    monkeypatch.undo()  # and it can be quantized again, to the same result as a model that never failed
    quantize(tiny_llama, QuantizationConfig(**fields), calibration_data=data, progress=False)
    quantize(original, QuantizationConfig(**fields), calibration_data=data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(IDS[:1]).logits, original(IDS[:1]).logits, rtol=0, atol=0)


def test_bnb_failure_restores_the_float_model(tiny_llama, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    original = copy.deepcopy(tiny_llama)
    _raise_on_call(monkeypatch, bnb.nn.Params4bit, "_quantize", 9)
    with pytest.raises(Boom):
        quantize(tiny_llama, QuantizationConfig(method="bnb_nf4"), progress=False)
    _assert_restored(tiny_llama, original)
    assert getattr(tiny_llama, "hf_quantizer", None) is None and not getattr(tiny_llama, "is_quantized", False)
    assert not hasattr(tiny_llama, "is_loaded_in_4bit")


def test_strict_refusal_restores_bnb(tiny_llama):
    pytest.importorskip("bitsandbytes")
    original = copy.deepcopy(tiny_llama)
    tiny_llama.model.layers[0].mlp.extra = nn.Conv1d(4, 4, 3)  # a weight no method here quantizes
    original.model.layers[0].mlp.extra = copy.deepcopy(tiny_llama.model.layers[0].mlp.extra)
    with pytest.raises(api.QuantizationError, match="model.layers.0.mlp.extra.weight"):
        quantize(tiny_llama, QuantizationConfig(method="bnb_int8"), progress=False, strict=True)
    _assert_restored(tiny_llama, original)
    assert getattr(tiny_llama, "hf_quantizer", None) is None


@pytest.mark.parametrize("method", ["rtn", "bnb_nf4"])
def test_without_memory_for_a_rollback_the_model_refuses_to_save(method, tiny_llama, monkeypatch, tmp_path):
    """When holding the originals would not fit (free memory faked to zero), nothing is held; after the
    failure the model is marked, and every way of saving it raises with the reason."""
    import hfcompress.quantization.rollback as R
    import hfcompress.quantization.sequential as S

    monkeypatch.setattr(S, "free_bytes", lambda device: 0)
    if method == "rtn":
        _raise_on_call(monkeypatch, api, "rtn_weight", 9)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        _raise_on_call(monkeypatch, bnb.nn.Params4bit, "_quantize", 9)
    with pytest.raises(Boom):
        quantize(tiny_llama, QuantizationConfig(method=method, **({"group_size": 32} if method == "rtn" else {})),
                 progress=False)
    assert "half-quantized" in tiny_llama.hfcompress_incomplete
    with pytest.raises(R.IncompleteQuantizationError, match="quantization failed after .* layer.*Boom"):
        tiny_llama.save_pretrained(tmp_path / "direct")
    assert not any((tmp_path / "direct").glob("*.safetensors"))
    with pytest.raises(IncompleteQuantizationError):
        save_checkpoint(tiny_llama, tmp_path / "atomic")
    assert not (tmp_path / "atomic").exists()
