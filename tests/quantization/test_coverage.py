"""Coverage audit: every targeted weight is quantized or listed with the reason it is not; the report,
config.json and the model card say "N of M linear weights quantized, X% of parameters"; ``strict=True``
refuses a model with weights meant to be quantized left in floating point (and leaves it as it was)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hfcompress.quantization import api
from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig, QuantizationError


def _linear_params(model) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_counts_and_reasons(tiny_llama):
    linears = _linear_params(tiny_llama)  # 2 layers x 7 + lm_head = 15
    total = sum(p.numel() for p in tiny_llama.parameters())
    ignore = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"]
    quantize(tiny_llama, QuantizationConfig(method="rtn", bits=4, group_size=32, ignore=ignore), progress=False)
    coverage = tiny_llama.hfcompress_report.coverage
    skipped_linears = {"lm_head", "model.layers.1.mlp.down_proj"}
    expected_params = sum(v for n, v in linears.items() if n not in skipped_linears)
    assert coverage["linear_weights"] == len(linears) == 15
    assert len(coverage["quantized"]) == 13
    assert coverage["quantized_parameters"] == expected_params
    assert coverage["line"] == f"13 of 15 linear weights quantized, {100 * expected_params / total:.1f}% of parameters"
    assert coverage["skipped"]["lm_head"] == "ignored by the user ('lm_head')"
    assert coverage["skipped"]["model.layers.1.mlp.down_proj"].startswith("ignored by the user")
    assert "embedding" in coverage["skipped"]["model.embed_tokens.weight"]
    assert coverage["left_float"] == []
    assert tiny_llama.config.hfcompress["coverage"]["line"] == coverage["line"]  # what config.json gets
    assert tiny_llama.hfcompress_report.coverage_line == coverage["line"]


def _tiny_mixtral(vocab_size: int = 128):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)).eval()


def test_fused_moe_experts_are_listed_and_strict_refuses_them():
    """Mixtral's experts are fused 3-D parameters, not nn.Linear: listed as unsupported, never counted as
    quantized; strict=True names them and leaves the model exactly as it was."""
    model = _tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = QuantizationConfig(method="rtn", bits=4, group_size=32)
    with pytest.raises(QuantizationError, match=r"strict=True: .*model\.layers\.0\.mlp\.experts\.gate_up_proj "
                                                r"\(unsupported module type MixtralExperts \(a 3-D"):
        quantize(model, config, progress=False, strict=True)
    assert all(type(m) is not api.CompressedLinear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert getattr(model.config, "quantization_config", None) is None and not hasattr(model, "hfcompress_report")

    quantize(model, config, progress=False)  # not strict: quantizes what it can and says what it did not
    coverage = model.hfcompress_report.coverage
    assert len(coverage["quantized"]) == 8  # q/k/v/o of 2 layers
    # + lm_head + per layer: router, gate_up_proj, down_proj
    assert coverage["linear_weights"] == 8 + 1 + 2 * 3
    reasons = coverage["skipped"]
    assert reasons["model.layers.1.mlp.experts.down_proj"].startswith("unsupported module type MixtralExperts")
    assert reasons["model.layers.0.mlp.gate.weight"].startswith("unsupported module type MixtralTopKRouter")


def test_strict_accepts_what_the_user_ignored():
    model = _tiny_mixtral()
    quantize(model, QuantizationConfig(method="rtn", bits=4, group_size=32,
                                       ignore=["lm_head", "re:.*mlp\\.gate", "re:.*mlp\\.experts"]),
             progress=False, strict=True)
    assert model.hfcompress_report.coverage["line"].startswith("8 of 15 linear weights quantized")


def test_a_target_left_in_float_is_caught(tiny_llama, monkeypatch):
    """The audit checks the modules, not the plan: a linear the method did not replace is reported as left in
    floating point (and refused under strict=True)."""
    real = api._install

    def skip_one(model, target, result, config, rollback):
        if target.name == "model.layers.0.mlp.up_proj":
            return None  # a bug in a method: it forgets one layer
        return real(model, target, result, config, rollback)

    monkeypatch.setattr(api, "_install", skip_one)
    config = QuantizationConfig(method="rtn", bits=4, group_size=32)
    with pytest.raises(QuantizationError, match="model.layers.0.mlp.up_proj .left in floating point"):
        quantize(tiny_llama, config, progress=False, strict=True)
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is nn.Linear  # restored
    quantize(tiny_llama, config, progress=False)
    coverage = tiny_llama.hfcompress_report.coverage
    assert coverage["left_float"] == ["model.layers.0.mlp.up_proj"]
    assert coverage["line"].startswith("13 of 15 linear weights quantized")


def test_bnb_coverage(tiny_llama):
    pytest.importorskip("bitsandbytes")
    quantize(tiny_llama, QuantizationConfig(method="bnb_int8"), progress=False, strict=True)
    coverage = tiny_llama.hfcompress_report.coverage
    assert coverage["line"].startswith("14 of 15 linear weights quantized")
    assert coverage["skipped"]["lm_head"].startswith("ignored by the user")


def test_cast_coverage(tiny_llama):
    quantize(tiny_llama, QuantizationConfig(method="cast", dtype="float16"), progress=False, strict=True)
    assert tiny_llama.hfcompress_report.coverage["line"] == \
        "15 of 15 linear weights cast to float16, 100.0% of parameters"


def test_card_and_config_state_coverage(tmp_path, tiny_reference_dir):
    from hfcompress.jobs.pipeline import quantize_to_folder

    out = quantize_to_folder(str(tiny_reference_dir), tmp_path / "out",
                             QuantizationConfig(method="rtn", bits=4, group_size=32), progress=False)
    line = json.loads((out / "config.json").read_text())["hfcompress"]["coverage"]["line"]
    assert line.startswith("14 of 15 linear weights quantized, ")
    card = (out / "README.md").read_text()
    assert f"**Coverage:** {line}." in card
    assert "- `lm_head`: ignored by the user ('lm_head')" in card


def test_cli_strict_refuses_and_writes_nothing(tmp_path, capsys, tiny_tokenizer):
    """``hfcompress quantize --strict`` is the same refusal as ``quantize(..., strict=True)``: one line naming the
    weights, exit 2, no output folder; without it the same folder quantizes."""
    from hfcompress.cli import main

    src = tmp_path / "mixtral"
    _tiny_mixtral(len(tiny_tokenizer)).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    args = ["quantize", str(src), str(out), "--method", "rtn", "--bits", "4", "--group_size", "32", "-q"]
    assert main(args + ["--strict"]) == 2  # EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "strict=True" in err and "experts.gate_up_proj" in err
    assert not out.exists()
    assert main(args) == 0 and (out / "config.json").is_file()
