"""``from_pretrained(..., quantization_config=HFCompressConfig(...))``: load-time RTN through transformers' quantizer
registration, checked against the reference path ``quantize`` -> ``save_pretrained`` -> ``load_compressed``."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfcompress import HFCompressConfig, QuantizationConfig, load_compressed, quantize, save_checkpoint
from hfcompress.core.errors import ConfigError, HFCompressError
from hfcompress.quantization import hf_quantizer
from hfcompress.quantization.config import QuantizationError
from hfcompress.quantization.modules import CompressedLinear
from hfcompress.quantization.packed import (FlatInputLinear, Int4PackedLinear, Int8PackedLinear, SharedInputSlice,
                                           kernel_module)

VOCAB = 320
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _float_folder(path, bias=False, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config).eval()
    if bias:  # nn.Linear biases start at zero in Llama's init: make them matter
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    return _float_folder(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def bias_folder(tmp_path_factory):
    return _float_folder(tmp_path_factory.mktemp("float-bias"), bias=True)


def _load(folder, **options):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                quantization_config=HFCompressConfig(**options))


def _reference(folder, out, **options):
    """The reference path: quantize the float model in memory, save it, load the checkpoint packed."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quantize(model, QuantizationConfig(method="rtn", **options), progress=False)
    model.save_pretrained(out)
    return load_compressed(out, dtype=torch.float32, progress=False)


def _logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(ids).logits


def _buffers(model) -> dict:
    return {name: tensor for name, tensor in model.named_buffers() if tensor is not None}


CASES = [
    dict(bits=4, group_size=32),  # our int4 kernel, symmetric groups
    dict(bits=4, group_size=32, symmetric=False, observer="mse"),  # zero points, searched clipping
    dict(bits=8, group_size=None),  # int8 per channel
    dict(bits=8, group_size=None, symmetric=False),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_load_time_rtn_is_the_reference_path(options, float_folder, tmp_path):
    ours = _load(float_folder, **options)
    reference = _reference(float_folder, tmp_path / "q", **options)
    kind = Int4PackedLinear if options["bits"] == 4 else Int8PackedLinear
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert isinstance(attn.q_proj, SharedInputSlice) and isinstance(mlp.up_proj, SharedInputSlice)  # fused
    assert all(type(kernel_module(m)) is kind for m in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj))
    assert type(ours.lm_head) is FlatInputLinear  # float (ignored by default, as quantize does), flat-input head
    # The same packed modules from the same codes and scales: every buffer equal to the bit ...
    ours_buffers, reference_buffers = _buffers(ours), _buffers(reference)
    assert ours_buffers.keys() == reference_buffers.keys()
    for name, tensor in ours_buffers.items():
        assert torch.equal(tensor, reference_buffers[name]), name
    # ... so the same arithmetic. The tolerance only allows a multithreaded GEMM to sum in another order:
    # at most K * eps relative to the terms' magnitude, K <= 192 inputs per dot product.
    a, b = _logits(ours), _logits(reference)
    tolerance = 192 * torch.finfo(torch.float32).eps * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=tolerance)
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["hfcompress"]
    assert ours.config.hfcompress["coverage"] == saved["coverage"]
    assert ours.hfcompress_report.coverage_line.startswith("14 of 15 linear weights quantized")
    for row, saved_row in zip(ours.config.hfcompress["layers"], saved["layers"], strict=True):
        assert (row["name"], row["group_size"], row["error_after"]) == \
            (saved_row["name"], saved_row["group_size"], pytest.approx(saved_row["error_after"]))


def test_biases_and_generate(bias_folder, tmp_path):
    """Biases load in either order around their weight (transformers streams them separately)."""
    ours = _load(bias_folder, bits=4, group_size=32)
    reference = _reference(bias_folder, tmp_path / "q", bits=4, group_size=32)
    assert ours.model.layers[1].self_attn.o_proj.bias is not None
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=0,
                               atol=192 * torch.finfo(torch.float32).eps * float(_logits(reference).abs().max()))
    prompt = TOKENS[:1, :6]
    out = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 14)
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=8, do_sample=False))


def test_compile_decode_option(bias_folder, tmp_path):
    """``compile_decode=True`` switches on the same static-cache compiled decode as ``load_compressed`` does (the
    compile itself and its tokens are tested in tests/runtime/test_decode.py); off by default."""
    from hfcompress.quantization.decode import compiled_decode_status

    assert compiled_decode_status(_load(bias_folder, bits=4, group_size=32)) == "off"
    model = _load(bias_folder, bits=4, group_size=32, compile_decode=True)
    assert compiled_decode_status(model) == "not compiled yet"
    assert model.generation_config.cache_implementation == "static"
    assert model.hf_quantizer.is_compileable  # else generate() skips the compile ("unable to meet the criteria")
    with pytest.raises(ConfigError, match="compile_decode must be True or False"):
        HFCompressConfig(compile_decode="yes")


def test_gpt2_conv1d(tmp_path):
    """GPT-2 stores its projections as transposed Conv1D weights, and its _init_weights reads c_proj.weight
    while transformers initialises what the checkpoint lacks: both must survive load-time quantization."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    ours = _load(tmp_path / "gpt2", bits=8, group_size=None)
    assert type(ours.transformer.h[0].attn.c_attn) is Int8PackedLinear
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)
    quantize(reference, QuantizationConfig(method="rtn", bits=8, group_size=None), progress=False)
    # The same dequantized weights (quantize's CompressedLinear multiplies them in float32); only the summation
    # order may differ: K * eps relative, K <= 256.
    want = _logits(reference)
    torch.testing.assert_close(_logits(ours), want, rtol=0,
                               atol=256 * torch.finfo(torch.float32).eps * float(want.abs().max()))
    assert ours.config.hfcompress["coverage"] == reference.config.hfcompress["coverage"]


def test_unpacked_load_saves_the_reference_checkpoint(float_folder, tmp_path):
    """packed=False keeps what quantize leaves; save_pretrained writes the same compressed-tensors folder."""
    options = dict(bits=4, group_size=32, symmetric=False)
    model = _load(float_folder, packed=False, **options)
    assert isinstance(model.model.layers[0].self_attn.q_proj, CompressedLinear)
    model.save_pretrained(tmp_path / "ours")
    _reference(float_folder, tmp_path / "reference", **options)
    ours, reference = (load_file(tmp_path / name / "model.safetensors") for name in ("ours", "reference"))
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    config, reference_config = (json.loads((tmp_path / name / "config.json").read_text())
                                for name in ("ours", "reference"))
    assert config["quantization_config"] == reference_config["quantization_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["hfcompress"]["coverage"] == reference_config["hfcompress"]["coverage"]


def test_packed_model_refuses_to_be_saved(float_folder, tmp_path):
    model = _load(float_folder, bits=4, group_size=32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(HFCompressError, match=r"packed runtime module .*HFCompressConfig\(packed=False\)"):
        save_checkpoint(model, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------------------
def test_config_round_trips():
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = HFCompressConfig(bits=8, group_size=None, symmetric=False, ignore=["lm_head", "re:.*down_proj"],
                              fuse_projections=False)
    data = config.to_dict()
    assert data["quant_method"] == "hfcompress" and data["bits"] == 8 and data["group_size"] is None
    again = HFCompressConfig.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert type(AutoQuantizationConfig.from_dict(data)) is hf_quantizer.HFCompressConfig  # transformers' registry
    assert config.quantization_config() == QuantizationConfig(method="rtn", bits=8, group_size=None, symmetric=False,
                                                              ignore=["lm_head", "re:.*down_proj"])


@pytest.mark.parametrize("options, message", [
    (dict(method="gptq"), r"gptq needs calibration data.*hfcompress\.quantize.*hfcompress quantize"),
    (dict(method="awq"), r"awq needs calibration data"),
    (dict(method="bnb_nf4"), r"BitsAndBytesConfig"),
    (dict(bits=5), r"bits=5 is not supported; choose one of 2, 3, 4, 8"),
    (dict(group_size=0), r"group_size must be a positive integer"),
    (dict(observer="max"), r"observer='max' is not supported"),
    (dict(packed="yes"), r"packed must be True or False"),
])
def test_bad_config_values(options, message):
    with pytest.raises(ConfigError, match=message):
        HFCompressConfig(**options)


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="unknown HFCompressConfig key 'group_sise'; did you mean 'group_size'"):
        HFCompressConfig.from_dict({"quant_method": "hfcompress", "group_sise": 32})


# ------------------------------------------------------------------------------------------------------
# Bad models and loads
# ------------------------------------------------------------------------------------------------------
def test_already_quantized_checkpoint_is_refused_by_transformers(float_folder, tmp_path):
    """A compressed-tensors folder goes to transformers' own quantizer, which refuses another config class
    before ours runs: load_compressed is the way to run it packed (README)."""
    _reference(float_folder, tmp_path / "q", bits=4, group_size=32)
    with pytest.raises(ValueError, match="quantized with CompressedTensorsConfig but you are passing a HFCompressConfig"):
        _load(tmp_path / "q")


def test_tied_head_must_be_ignored(tmp_path):
    folder = _float_folder(tmp_path / "tied", tie=True)
    with pytest.raises(QuantizationError, match=r"lm_head\.weight is tied.*HFCompressConfig\.ignore"):
        _load(folder, ignore=[], group_size=32)


def test_nan_weight_is_named(float_folder, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "nan"
    folder.mkdir()
    tensors = load_file(float_folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((float_folder / "config.json").read_text())
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN/Inf"):
        _load(folder, group_size=32)


def test_group_size_dividing_nothing_and_device_maps(float_folder):
    with pytest.raises(ConfigError, match=r"group_size=40 divides none"):
        _load(float_folder, group_size=40)
    model = AutoModelForCausalLM.from_pretrained(float_folder, device_map="cpu",
                                                 quantization_config=HFCompressConfig(group_size=32))
    assert isinstance(kernel_module(model.model.layers[0].mlp.down_proj), Int4PackedLinear)
    with pytest.raises(ConfigError, match="runs a model on one device"):
        AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=HFCompressConfig(),
                                             device_map={"model": "cpu", "lm_head": "disk"})


# ------------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------------
def test_importing_again_keeps_one_registration(float_folder):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    module = importlib.reload(hf_quantizer)  # a second import of the module: no "already registered"
    importlib.import_module("hfcompress.quantization.hf_quantizer")
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hfcompress"] is module.HFCompressConfig
    assert AUTO_QUANTIZER_MAPPING["hfcompress"] is module.HFCompressQuantizer
    model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32,
                                                 quantization_config=module.HFCompressConfig(group_size=32))
    assert isinstance(kernel_module(model.model.layers[0].mlp.down_proj), Int4PackedLinear)
    before = _load(float_folder, group_size=32)  # a config made from the class imported before the reload
    assert torch.equal(_logits(before), _logits(model))


def test_a_foreign_quantizer_of_that_name_is_not_replaced():
    class Foreign:
        pass

    mapping = {"hfcompress": Foreign}
    with pytest.raises(HFCompressError, match="already has a quantizer 'hfcompress'"):
        hf_quantizer._register(mapping, "hfcompress", hf_quantizer.HFCompressConfig, None)
    assert mapping["hfcompress"] is Foreign


def test_public_name_registers_on_access():
    """``import hfcompress`` stays light; touching ``hfcompress.HFCompressConfig`` registers the quantizer."""
    code = ("import hfcompress\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
            "assert 'hfcompress' not in M\n"
            "hfcompress.HFCompressConfig\n"
            "assert M['hfcompress'].__name__ == 'HFCompressQuantizer'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.cuda
def test_load_time_rtn_on_cuda(float_folder, tmp_path):
    """device_map='cuda': weights are rounded on the GPU as they arrive and run on the CUDA modules
    (tinygemm int4); the reference is quantize + load_compressed(device='cuda') of the same bf16 weights."""
    from hfcompress.quantization import cuda_runtime as CR

    options = dict(bits=4, group_size=32, symmetric=False)
    ours = AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.bfloat16, device_map="cuda",
                                                quantization_config=HFCompressConfig(**options))
    assert type(kernel_module(ours.model.layers[0].mlp.down_proj)) is CR.CudaInt4Linear
    model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.bfloat16)
    quantize(model, QuantizationConfig(method="rtn", **options), progress=False)
    model.save_pretrained(tmp_path / "q")
    reference = load_compressed(tmp_path / "q", device="cuda", dtype=torch.bfloat16, progress=False)
    tokens = TOKENS.cuda()
    got, want = _logits(ours, tokens).float(), _logits(reference, tokens).float()
    # Rounding on the GPU may break a tie the other way than on the CPU (a code off by one step in a few
    # weights); bf16 logits then differ by a few bf16 steps, far below the int4 error itself.
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert ours.generate(tokens[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 8)
