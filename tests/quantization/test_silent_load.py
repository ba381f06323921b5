"""A checkpoint with per-layer group-size fallbacks loads with plain ``from_pretrained`` without a word from
compressed-tensors (it used to log "Could not match `model.layers.N.mlp.down_proj`" once per layer) and
each layer still gets its own scheme."""

from __future__ import annotations

import json
import logging
import warnings

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig


def test_fallback_groups_load_silently_and_correctly(tmp_path, caplog):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our own fallback warning at quantize time
        quantize(model, QuantizationConfig(method="rtn", bits=4, group_size=64, symmetric=False), progress=False)
    assert model.hfcompress_report.fallbacks == {"model.layers.0.mlp.down_proj": 32, "model.layers.1.mlp.down_proj": 32}
    model.save_pretrained(tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["targets"] for g in groups.values()] == [list(model.hfcompress_report.fallbacks), ["Linear"]]

    caplog.set_level(logging.DEBUG, logger="compressed_tensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] + \
        [str(w.message) for w in caught]
    assert not [m for m in messages if "match" in m.lower()], messages
    assert not [r for r in caplog.records if r.name.startswith("compressed_tensors") and r.levelno >= logging.WARNING]
    down = reloaded.model.layers[0].mlp.down_proj
    assert down.quantization_scheme.weights.group_size == 32
    assert reloaded.model.layers[0].mlp.up_proj.quantization_scheme.weights.group_size == 64
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
