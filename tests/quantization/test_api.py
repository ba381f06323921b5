"""quantize() end to end on the tiny fixtures: every method, the report, the fallback, the error paths."""

import hashlib
import math

import pytest
import torch

from hfcompress.core.errors import ConfigError, DataError, HFCompressError
from hfcompress.models.evaluate import count_parameters, perplexity
from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig, QuantizationError
from hfcompress.quantization.modules import CompressedLinear


def _config(**kwargs):
    defaults = dict(num_samples=16, seq_len=64, group_size=32)
    defaults.update(kwargs)
    return QuantizationConfig(**defaults)


def _linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_method_on_every_architecture(request, fixture, method, calibration_ids):
    model = request.getfixturevalue(fixture)
    ids = calibration_ids[:2, :32]
    before = model(ids)[0]
    params = count_parameters(model)
    linear_names = {n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head"}
    quantize(model, _config(method=method, bits=4), calibration_data=calibration_ids, progress=False)
    assert _linears(model) == linear_names
    after = model(ids)[0]
    assert torch.isfinite(after).all()
    assert ((after - before).norm() / before.norm()).item() < 0.3
    assert count_parameters(model) == params  # logical count, not packed words
    report = model.hfcompress_report
    assert [layer.name for layer in report.layers] == [n for n, _ in model.named_modules() if n in linear_names]
    for layer in report.layers:
        assert 0 < layer.error_after < 0.5
        if method != "rtn" and layer.metric == "output":
            assert layer.error_after <= layer.error_before * 1.05
    assert report.fallbacks == {}  # 32 divides every width (64, 128, 192, 256)


def test_gptq_and_awq_reduce_layer_error_and_perplexity_vs_rtn(tiny_reference_dir, calibration_ids, eval_ids):
    from transformers import AutoModelForCausalLM

    results = {}
    for method in ("rtn", "gptq", "awq"):
        model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
        quantize(model, _config(method=method, bits=2, group_size=64), calibration_data=calibration_ids,
                 progress=False)
        layers = model.hfcompress_report.layers
        results[method] = (sum(layer.error_after for layer in layers) / len(layers), perplexity(model, eval_ids))
    assert results["gptq"][0] < 0.85 * results["rtn"][0]
    assert results["awq"][0] < 0.9 * results["rtn"][0]
    # 2 bits, where the methods differ clearly (fp32 ~25.1, RTN ~28.2, GPTQ ~27.5, AWQ ~27.1 on these blocks)
    assert results["gptq"][1] < 0.99 * results["rtn"][1]
    assert results["awq"][1] < 0.99 * results["rtn"][1]


def test_calibration_dtype_runs_the_forward_passes_under_autocast(tiny_reference_dir, calibration_ids, eval_ids,
                                                                   monkeypatch):
    """calibration_dtype='bfloat16' on a float32 model: the capture/statistics/propagation passes run under
    bf16 autocast (the quantization math does not), the model stays float32, and the result is close to the
    float32 calibration's (bf16 rounds activations to ~3 significant digits; statistics stay float32)."""
    from transformers import AutoModelForCausalLM

    from hfcompress.quantization import calibrate as C
    from hfcompress.quantization import sequential as S

    seen = []
    for module, name in ((C, "capture_first_layer_inputs"), (C, "collect_stats"), (C, "propagate"),
                         (S, "quantize_layer_in_one_pass")):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    ppl = {}
    for dtype, true_sequential in ((None, True), ("bfloat16", True), ("bfloat16", False)):
        seen.clear()
        model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
        quantize(model, _config(method="gptq", bits=3, calibration_dtype=dtype, true_sequential=true_sequential),
                 calibration_data=calibration_ids, progress=False)
        assert {s[1] for s in seen} == {False if dtype is None else torch.bfloat16}
        passes = {"quantize_layer_in_one_pass"} if true_sequential else {"collect_stats", "propagate"}
        assert {s[0] for s in seen} == {"capture_first_layer_inputs"} | passes
        assert not torch.is_autocast_enabled("cpu")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        ppl[dtype] = perplexity(model, eval_ids)
    assert abs(ppl["bfloat16"] / ppl[None] - 1) < 0.01


def _llama(vocab_size, hidden=128, intermediate=192, layers=2, **kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False, **kwargs)
    return LlamaForCausalLM(config).eval()


def test_group_size_fallback_is_warned_reported_and_recorded(tiny_tokenizer):
    model = _llama(len(tiny_tokenizer))  # hidden 128, MLP 192: like the base teacher's 256 / 688
    with pytest.warns(UserWarning) as caught:
        quantize(model, _config(method="rtn", group_size=128), progress=False)
    # one line per (width, group), layer indices folded: a 30-layer model's warning does not list 180 names
    fallback = [str(w.message) for w in caught if "does not divide" in str(w.message)]
    assert fallback == ["group_size=128 does not divide the width of 2 layer(s); they use a smaller group: "
                        "width 192 -> 64: model.layers.*.mlp.down_proj (2 layers)"]
    report = model.hfcompress_report
    assert report.fallbacks == {"model.layers.0.mlp.down_proj": 64, "model.layers.1.mlp.down_proj": 64}
    assert model.model.layers[0].mlp.down_proj.group_size == 64
    assert model.model.layers[0].mlp.up_proj.group_size == 128
    assert all(layer.metric == "weight" for layer in report.layers)  # no calibration data
    groups = model.config.quantization_config["config_groups"]
    # The named layers' group first, the class-wide one last (see ct_format.quantization_config).
    assert groups["group_1"]["targets"] == ["Linear"] and groups["group_1"]["weights"]["group_size"] == 128
    assert groups["group_0"]["targets"] == list(report.fallbacks)
    assert groups["group_0"]["weights"]["group_size"] == 64
    assert model.config.hfcompress["fallback_group_sizes"] == report.fallbacks


def test_per_channel_fallback_when_no_power_of_two_divides():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    with pytest.warns(UserWarning, match="per-channel"):
        quantize(model, QuantizationConfig(method="rtn", group_size=4, ignore=[]), progress=False)
    assert [model[i].group_size for i in range(3)] == [4, 2, None]


def test_rtn_mse_observer_uses_calibration_statistics(tiny_llama, calibration_ids):
    quantize(tiny_llama, _config(method="rtn", observer="mse", bits=3), calibration_data=calibration_ids,
             progress=False)
    layers = tiny_llama.hfcompress_report.layers
    assert all(layer.metric == "output" for layer in layers)
    # The search minimises each group's own output error; the full error (with cross-group terms) improves
    # on min-max for nearly every layer.
    assert sum(layer.error_after < layer.error_before for layer in layers) >= len(layers) - 2
    assert sum(layer.error_after for layer in layers) < 0.95 * sum(layer.error_before for layer in layers)


def test_rtn_stochastic_rounding_costs_about_sqrt2_in_error(tiny_llama):
    """Unbiased but noisier: the rounding error variance is p(1-p) s^2 (mean s^2/6) vs s^2/12 for nearest."""
    quantize(tiny_llama, _config(method="rtn", rounding="stochastic", seed=1), progress=False)
    ratio = [layer.error_after / layer.error_before for layer in tiny_llama.hfcompress_report.layers]
    assert 1.2 < sum(ratio) / len(ratio) < 1.8


def test_cast_is_a_plain_dtype_cast(tiny_llama, tmp_path):
    ids = torch.randint(0, 100, (1, 16))
    before = tiny_llama(ids).logits
    quantize(tiny_llama, QuantizationConfig(method="cast", dtype="bfloat16"), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in tiny_llama.parameters())
    assert not _linears(tiny_llama)
    torch.testing.assert_close(tiny_llama(ids).logits.float(), before, rtol=0.05, atol=0.05)
    tiny_llama.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_same_seed_gives_identical_bytes(tiny_llama, calibration_ids, tmp_path):
    def saved_hash(seed, method, rounding):
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(type(tiny_llama.config)(**tiny_llama.config.to_dict())).eval()
        quantize(model, _config(method=method, rounding=rounding, seed=seed), calibration_data=calibration_ids,
                 progress=False)
        out = tmp_path / f"{method}-{rounding}-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(out)
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    assert saved_hash(0, "rtn", "stochastic") == saved_hash(0, "rtn", "stochastic")
    assert saved_hash(0, "rtn", "stochastic") != saved_hash(1, "rtn", "stochastic")
    assert saved_hash(0, "gptq", "nearest") == saved_hash(0, "gptq", "nearest")


# --------------------------------------------------------------------------------------------------------
# Bad input: a clear one-line error and an untouched model
# --------------------------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state):
    assert not _linears(model)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.parametrize("make_config, data, error, words", [
    (lambda: _config(method="gptq"), None, DataError, "needs calibration data"),
    (lambda: _config(method="awq"), [], DataError, "empty"),
    (lambda: _config(method="gptq"), ["x = 1\n"], DataError, "only 5 tokens .1 text.s..; at least 128"),
    (lambda: _config(method="gptq", seq_len=512), "ids", DataError, "context"),
    (lambda: _config(method="rtn", group_size=80), None, ConfigError, "use group_size=64"),
    (lambda: _config(method="rtn", ignore=["re:.*"]), None, ConfigError, "no nn.Linear layers"),
    (lambda: _config(method="gptq", sequential_targets=["nothing_here"]), "ids", ConfigError, "sequential_targets"),
])
def test_bad_input_raises_and_leaves_the_model_alone(tiny_llama, tiny_tokenizer, calibration_ids, make_config,
                                                     data, error, words):
    state = _state(tiny_llama)
    if data == "ids":
        data = calibration_ids
    with pytest.raises(error, match=words) as info:
        quantize(tiny_llama, make_config(), calibration_data=data, tokenizer=tiny_tokenizer, progress=False)
    assert "\n" not in str(info.value)
    _assert_untouched(tiny_llama, state)


def test_text_without_tokenizer_is_an_error(tiny_llama, calibration_texts):
    with pytest.raises(DataError, match="tokenizer"):
        quantize(tiny_llama, _config(method="gptq"), calibration_data=calibration_texts, progress=False)


def test_nan_weight_is_named(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    state = _state(tiny_llama)
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN/Inf"):
        quantize(tiny_llama, _config(method="rtn"), progress=False)
    assert not _linears(tiny_llama) and state.keys() == tiny_llama.state_dict().keys()


def test_already_quantized_model_is_refused(tiny_llama):
    quantize(tiny_llama, _config(method="rtn"), progress=False)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(tiny_llama, _config(method="rtn"), progress=False)
    tiny_llama.config.quantization_config = None
    with pytest.raises(QuantizationError, match="CompressedLinear"):
        quantize(tiny_llama, QuantizationConfig(method="cast"), progress=False)  # cast reads no calibration fields


def test_tied_weights_must_be_ignored(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(QuantizationError, match="tied weights.*add 'lm_head' to QuantizationConfig.ignore"):
        quantize(model, _config(method="rtn", ignore=[]), progress=False)


def test_unknown_architecture_says_how_to_set_sequential_targets(calibration_ids):
    class Flat(torch.nn.Module):  # linears but no list of layers
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(600, 32)
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, input_ids):
            return self.b(self.a(self.embed(input_ids)))

    with pytest.raises(ConfigError, match="sequential_targets"):
        quantize(Flat(), _config(method="gptq", ignore=[]), calibration_data=calibration_ids, progress=False)
    # Naming the stages works (each linear is its own "layer").
    model = quantize(Flat(), _config(method="gptq", ignore=[], sequential_targets=["a", "b"]),
                     calibration_data=calibration_ids, progress=False)
    assert _linears(model) == {"a", "b"}
    assert all(layer.metric == "output" for layer in model.hfcompress_report.layers)


def test_awq_skips_folds_that_would_change_the_function(tiny_tokenizer, calibration_ids):
    """OPT with post-LayerNorm: self_attn_layer_norm also feeds the residual, so its fold must be undone."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                     ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                                     word_embed_proj_dim=64, do_layer_norm_before=False)).eval()
    quantize(model, _config(method="awq", bits=3), calibration_data=calibration_ids, progress=False)
    folded = {layer.extra.get("awq_folded_into") for layer in model.hfcompress_report.layers}
    assert "self_attn_layer_norm" not in folded and "final_layer_norm" not in folded
    assert "self_attn.v_proj" in folded


def test_calibration_data_sources(tiny_llama, tiny_tokenizer, calibration_texts, tmp_path):
    """Texts, a datasets.Dataset and a text-source string give the same token blocks for the same seed."""
    import datasets

    from hfcompress.quantization.calibrate import calibration_blocks

    as_list = calibration_blocks(calibration_texts, tiny_tokenizer, 4, 32, seed=3)
    as_dataset = calibration_blocks(datasets.Dataset.from_dict({"text": calibration_texts}), tiny_tokenizer, 4, 32,
                                    seed=3)
    assert as_list.shape == (4, 32) and torch.equal(as_list, as_dataset)
    assert not torch.equal(as_list, calibration_blocks(calibration_texts, tiny_tokenizer, 4, 32, seed=4))
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(calibration_texts):
        (folder / f"{i}.py").write_text(text)
    from_folder = calibration_blocks(str(folder), tiny_tokenizer, 4, 32, seed=3)
    assert from_folder.shape == (4, 32)
    quantize(tiny_llama, _config(method="gptq", num_samples=4, seq_len=32), calibration_data=str(folder),
             tokenizer=tiny_tokenizer, progress=False)
    assert tiny_llama.hfcompress_report.calibration_samples == 4
