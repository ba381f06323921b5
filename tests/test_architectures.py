"""Every method, the reloads and distillation on tiny random models of the families users bring most:
Llama, Qwen2, Qwen3, Mistral, Gemma 3 (text), Phi-3 (fused qkv_proj / gate_up_proj) and GPT-2 (Conv1D).

Each model has 2 layers of width 64 and a 256-token vocabulary (Gemma 3's real one has 262k: the code paths
that matter here, tied embeddings and its sliding-window/global layer pattern, do not depend on its size).
The README's "Architectures" table states what these tests check.
"""

from __future__ import annotations

import pytest
import torch

import transformers as T
from hfcompress import QuantizationConfig, load_compressed, quantize
from hfcompress.core.errors import HFCompressError
from hfcompress.quantization import awq as A
from hfcompress.quantization import calibrate as C
from hfcompress.quantization.saving import save_checkpoint

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: T.LlamaConfig(**_COMMON),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=16),
    "mistral": lambda: T.MistralConfig(**_COMMON, sliding_window=16),
    # layer 0 sliding-window (8 tokens), layer 1 global, each with its own rotary base; tied embeddings
    "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                         tie_word_embeddings=True),
    # Phi-3-mini has as many key/value heads as query heads: v's third of qkv_proj can take o_proj's scale
    "phi3": lambda: T.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}
# AWQ's scale folds found in layer 0 (v -> o is skipped under grouped-query attention: widths differ).
AWQ_FOLDS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "qwen2": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "qwen3": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "gemma3": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    "phi3": ["input_layernorm", "self_attn.qkv_proj@2/3", "post_attention_layernorm", "mlp.gate_up_proj@1/2"],
    "gpt2": ["ln_1", "ln_2"],
}


def make_model(family: str):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))  # (N, T)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def decoder_layers(model):
    linears = {n for n, m in model.named_modules() if C.is_linear(m)}
    return C.find_sequential_layers(model, None, linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_folds_keep_the_function(family, ids):
    model = make_model(family)
    _, layer = decoder_layers(model)[0]
    modules = dict(layer.named_modules())
    mappings = A.layer_mappings(layer, {n for n, m in modules.items() if C.is_linear(m)})
    assert [prev for prev, _ in mappings] == AWQ_FOLDS[family]
    before = logits(model, ids)
    for prev, linears in mappings:
        first = modules[linears[0]]
        scale = torch.rand(first.weight.shape[0] if C.is_conv1d(first) else first.in_features) + 0.5
        A.scale_inputs([modules[n] for n in linears], scale)
        A.fold_into(modules, prev, scale)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "qwen2-sliding"])
def test_calibration_gives_each_layer_its_own_mask_and_rotary(family, calibration):
    """Layers of different attention types get different masks/rotary tables; propagating the calibration
    inputs through the float layers must reproduce the model's own hidden states."""
    torch.manual_seed(0)
    if family == "qwen2-sliding":  # layer types: full, sliding, sliding
        config = T.Qwen2Config(**{**_COMMON, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=8,
                               max_window_layers=1)
    else:  # sliding, full, sliding
        config = FAMILIES[family]()
        config = T.Gemma3TextConfig(**{**config.to_dict(), "num_hidden_layers": 3, "layer_types": None})
    model = T.AutoModelForCausalLM.from_config(config).eval()
    layers = [layer for _, layer in decoder_layers(model)]
    inputs = C.capture_first_layer_inputs(model, layers[0], calibration)
    C.capture_layer_kwargs(model, layers, calibration, inputs)
    assert set(inputs.layer_kwargs) == ({1} if family == "gemma3" else {1, 2})  # the layers unlike layer 0
    first = list(inputs.kwargs)
    for index in (0, 1):
        C.use_layer_kwargs(inputs, index, first)
        C.propagate(layers[index], inputs)
    with torch.no_grad():  # hidden_states[2]: the input of layer 2 (the last entry is after the final norm)
        expected = model.model(calibration, output_hidden_states=True).hidden_states[2]
    got = torch.cat([C.hidden_states(inputs, i) for i in range(len(inputs))])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_integer_methods_save_and_reload(family, method, calibration, ids, tmp_path):
    model = make_model(family)
    reference = logits(model, ids)
    config = QuantizationConfig(method=method, bits=4, group_size=32, num_samples=16, seq_len=32)
    quantize(model, config, calibration_data=calibration if method != "rtn" else None, progress=False)
    report = model.hfcompress_report
    assert len(report.layers) == 4 * 2 if family in ("phi3", "gpt2") else 7 * 2
    if method != "rtn":  # on the objective they minimise, never worse than round-to-nearest
        assert sum(layer.error_after for layer in report.layers) \
            <= 1.001 * sum(layer.error_before for layer in report.layers)
    quantized = logits(model, ids)
    assert 0 < (quantized - reference).abs().max() < 0.5 * reference.abs().max()
    if family == "gpt2":  # compressed-tensors quantizes nn.Linear only; GPT-2's Conv1D would load unquantized
        with pytest.raises(HFCompressError, match="Conv1D"):
            save_checkpoint(model, tmp_path / "out")
        return
    out = save_checkpoint(model, tmp_path / "out")
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), quantized, rtol=0, atol=1e-4)
    if family == "gemma3":  # the tied embedding stays tied (and unquantized) through the checkpoint
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    packed = load_compressed(out)  # packed int4 weights, bf16 activations
    assert (logits(packed, ids) - quantized).abs().max() < 0.05 * quantized.abs().max()


@pytest.mark.parametrize("method", ["cast", "bnb_int8", "bnb_nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_data_free_methods_save_and_reload(family, method, ids, tmp_path):
    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    model = make_model(family)
    reference = logits(model, ids)
    model = quantize(model, QuantizationConfig(method=method), progress=False)
    quantized = logits(model, ids)
    assert (quantized - reference).abs().max() < 0.5 * reference.abs().max()
    out = save_checkpoint(model, tmp_path / "out")
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    # bf16 / nf4 dequantization happens in the matmul's dtype: reload matches up to its rounding
    torch.testing.assert_close(logits(reloaded, ids), quantized, rtol=0, atol=2e-2 * quantized.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_steps(family, calibration, tmp_path):
    from hfcompress import DistillationConfig, DistillationTrainer, make_student

    teacher = make_model(family)
    student = make_student(teacher, num_layers=1)
    assert student.config.model_type == teacher.config.model_type
    dataset = [{"input_ids": row, "labels": row} for row in calibration[:4]]
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                              save_strategy="no", logging_steps=1, use_cpu=True, hidden_weight=1.0)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
