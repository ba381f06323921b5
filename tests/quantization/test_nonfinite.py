"""NaN/Inf in the calibration activations stops quantization with the place named; the model is left as it
was and nothing is written. (NaN *weights* are refused before anything starts: test_api.)"""

from __future__ import annotations

import copy

import pytest
import torch

from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig, QuantizationError

IDS = torch.randint(0, 500, (8, 32), generator=torch.Generator().manual_seed(0))
METHODS = {
    "gptq": dict(method="gptq", bits=4, group_size=32, num_samples=8, seq_len=32),
    "gptq_two_pass": dict(method="gptq", bits=4, group_size=32, num_samples=8, seq_len=32, true_sequential=False),
    "awq": dict(method="awq", bits=4, group_size=32, num_samples=8, seq_len=32),
    "rtn_mse": dict(method="rtn", bits=4, group_size=32, observer="mse", num_samples=8, seq_len=32),
}


def _same(model, original) -> bool:
    a, b = model.state_dict(), original.state_dict()
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True) for k in a)


@pytest.mark.parametrize("case", list(METHODS))
def test_nan_inside_a_layer_names_the_linear(case, tiny_llama):
    """A NaN in layer 1's MLP norm (not a quantized weight, so not caught up front) reaches gate/up_proj."""
    with torch.no_grad():
        tiny_llama.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    original = copy.deepcopy(tiny_llama)
    with pytest.raises(QuantizationError, match=r"activations entering model\.layers\.1\.mlp\.(gate|up)_proj "
                                                r"\(decoder layer model\.layers\.1\) hold NaN/Inf"):
        quantize(tiny_llama, QuantizationConfig(**METHODS[case]), calibration_data=IDS, progress=False)
    assert _same(tiny_llama, original) and getattr(tiny_llama.config, "quantization_config", None) is None


@pytest.mark.parametrize("case", ["gptq", "gptq_two_pass"])
def test_inf_out_of_a_layer_names_the_layer(case, tiny_llama):
    def overflow(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0, 0] = float("inf")  # what a float16 overflow looks like

    tiny_llama.model.layers[0].register_forward_hook(overflow)
    with pytest.raises(QuantizationError, match=r"the outputs of decoder layer model\.layers\.0 hold 8 NaN/Inf"):
        quantize(tiny_llama, QuantizationConfig(**METHODS[case]), calibration_data=IDS, progress=False)
    assert all(type(m) is torch.nn.Linear for n, m in tiny_llama.named_modules() if n.endswith("_proj"))


def test_nan_embeddings_are_named(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[IDS[0, 0]] = float("nan")
    with pytest.raises(QuantizationError, match=r"inputs of the first decoder layer model\.layers\.0 \(the "
                                                r"embeddings"):
        quantize(tiny_llama, QuantizationConfig(**METHODS["gptq"]), calibration_data=IDS, progress=False)


def test_nothing_is_written(tmp_path, tiny_reference_dir, calibration_texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.jobs.pipeline import quantize_to_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    AutoTokenizer.from_pretrained(tiny_reference_dir).save_pretrained(tmp_path / "broken")
    (tmp_path / "data.txt").write_text("\n\n".join(calibration_texts))
    with pytest.raises(QuantizationError, match="model.layers.0"):
        quantize_to_folder(str(tmp_path / "broken"), tmp_path / "out", QuantizationConfig(**METHODS["gptq"]),
                           calibration_data=str(tmp_path / "data.txt"), progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "data.txt"]  # no temporary folder left


def test_nan_weights_stop_bitsandbytes_too(tiny_llama):
    pytest.importorskip("bitsandbytes")
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight has 1 NaN/Inf"):
        quantize(tiny_llama, QuantizationConfig(method="bnb_nf4"), progress=False)
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
