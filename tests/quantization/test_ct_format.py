"""compressed-tensors checkpoints: our tensors are the compressor's, and plain transformers loads them.

The load test runs in a subprocess that never imports hfcompress, as a user's would.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hfcompress.core.errors import HFCompressError
from hfcompress.quantization import ct_format
from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig
from hfcompress.quantization.modules import CompressedLinear

ct = pytest.importorskip("compressed_tensors")


def _llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # MLP width 192 with group_size 128 exercises the fallback group (64), like the base teacher's 688.
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=192,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 32, False), (8, None, False),
                                                          (3, 16, False), (2, None, True)])
def test_module_tensors_are_what_compressed_tensors_writes(bits, group_size, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    linear = torch.nn.Linear(64, 40, bias=True)
    model = torch.nn.Sequential(linear)
    quantize(model, QuantizationConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric,
                                       ignore=[]), progress=False)
    module = model[0]
    assert isinstance(module, CompressedLinear)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, type="int",
                            strategy="group" if group_size else "channel", group_size=group_size)
    state = {"weight": module.dequantized_weight(), "weight_scale": module.weight_scale}
    if not symmetric:
        state["weight_zero_point"] = module.zero_point().to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(module.weight_packed, theirs["weight_packed"])
    assert torch.equal(module.weight_shape, theirs["weight_shape"])
    if symmetric:
        assert "weight_zero_point" not in theirs and not hasattr(module, "weight_zero_point")
    else:
        packed = theirs["weight_zero_point"]
        rows = ct_format.zero_point_rows(40, bits)
        assert module.weight_zero_point.shape == (rows, packed.shape[1])
        assert torch.equal(module.weight_zero_point[:packed.shape[0]], packed)
        assert not module.weight_zero_point[packed.shape[0]:].any()
    # And their decompression gives our weights exactly.
    restored = PackedQuantizationCompressor.decompress(
        {k: v for k, v in module.state_dict().items() if k != "bias"}, QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(restored["weight"], module.dequantized_weight())


def test_zero_point_rows_match_what_the_installed_loader_allocates():
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False,
                                                                              strategy="channel"))
    meta = {"weight": torch.empty(40, 64, device="meta"), "weight_scale": torch.empty(40, 1, device="meta"),
            "weight_zero_point": torch.empty(40, 1, dtype=torch.int8, device="meta")}
    allocated = PackedQuantizationCompressor.compress(meta, scheme)["weight_zero_point"]
    assert ct_format.zero_point_rows(40, 4) == allocated.shape[0]


def test_quantization_config_validates_in_compressed_tensors_and_transformers(tiny_tokenizer):
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = _llama(len(tiny_tokenizer))
    with pytest.warns(UserWarning):
        quantize(model, QuantizationConfig(method="rtn", bits=4, group_size=128, symmetric=False), progress=False)
    data = model.config.quantization_config
    parsed = CTConfig.model_validate(data)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    assert parsed.config_groups["group_0"].targets == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert parsed.config_groups["group_1"].targets == ["Linear"]  # last: see ct_format.quantization_config
    assert CompressedTensorsConfig.from_dict(data).quantization_config.config_groups.keys() == {"group_0", "group_1"}


_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM

    results = {}
    for folder, auto in json.loads(sys.argv[1]):
        cls = AutoModelForCausalLM if auto == "causal" else AutoModel
        model = cls.from_pretrained(folder).eval()
        schemes = sum(hasattr(m, "quantization_scheme") for m in model.modules())
        expected = load_file(folder + "/../" + folder.rsplit("/", 1)[1] + ".expected.safetensors")
        with torch.no_grad():
            out = model(input_ids=expected["input_ids"])[0]
        results[folder] = {"max_abs_diff": (out - expected["output"]).abs().max().item(),
                           "scale": expected["output"].abs().max().item(), "quantized_modules": schemes}
    results["hfcompress_imported"] = any(name.startswith("hfcompress") for name in sys.modules)
    print(json.dumps(results))
""")


def test_plain_transformers_loads_our_checkpoints_with_the_same_outputs(tmp_path, tiny_reference_dir,
                                                                        tiny_tokenizer, calibration_ids):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BertConfig, BertModel

    ids = calibration_ids[:2, :48]
    cases = []

    def save(name, model, auto="causal"):
        folder = tmp_path / name
        model.save_pretrained(folder)
        with torch.no_grad():
            output = model(input_ids=ids)[0]
        save_file({"input_ids": ids.contiguous(), "output": output.contiguous()},
                  tmp_path / f"{name}.expected.safetensors")
        cases.append((str(folder), auto, sum(isinstance(m, CompressedLinear) for m in model.modules())))

    teacher = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
    quantize(teacher, QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=16, seq_len=64),
             calibration_data=calibration_ids, progress=False)
    save("gptq-int4-sym-g32", teacher)
    for name, kwargs in [("rtn-int4-asym-g128-fallback", dict(bits=4, group_size=128, symmetric=False)),
                         ("rtn-int8-sym-channel", dict(bits=8, group_size=None)),
                         ("awq-int3-asym-channel", dict(method="awq", bits=3, group_size=None, symmetric=False)),
                         ("rtn-int2-sym-g64", dict(bits=2, group_size=64))]:
        model = _llama(len(tiny_tokenizer), seed=len(cases))
        config = QuantizationConfig(**{"method": "rtn", "num_samples": 16, "seq_len": 64, **kwargs})
        with pytest.warns(UserWarning) if config.group_size == 128 else _no_warning():
            quantize(model, config, calibration_data=calibration_ids if config.method == "awq" else None,
                     progress=False)
        save(name, model)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)).eval()
    quantize(bert, QuantizationConfig(method="rtn", bits=8, group_size=32, symmetric=False), progress=False)
    save("bert-int8-asym-g32", bert, auto="encoder")

    result = subprocess.run([sys.executable, "-c", _LOADER, json.dumps([c[:2] for c in cases])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("hfcompress_imported") is False
    for folder, _, quantized in cases:
        got = report[folder]
        assert got["quantized_modules"] == quantized, folder  # compressed-tensors rebuilt every layer
        assert got["max_abs_diff"] <= 1e-4 * max(1.0, got["scale"]), (folder, got)
    gptq = json.loads((tmp_path / "gptq-int4-sym-g32" / "config.json").read_text())["quantization_config"]
    assert gptq["config_groups"]["group_0"]["weights"]["actorder"] == "weight"  # as llm-compressor writes it
    config = json.loads((tmp_path / "rtn-int4-asym-g128-fallback" / "config.json").read_text())
    assert config["hfcompress"]["fallback_group_sizes"] == {"model.layers.0.mlp.down_proj": 64,
                                                            "model.layers.1.mlp.down_proj": 64}
    assert config["hfcompress"]["quantization"]["symmetric"] is False
    assert len(config["hfcompress"]["layers"]) == 14


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gpt2_conv1d_layers_are_refused_at_save_time(tiny_gpt2, tmp_path):
    quantize(tiny_gpt2, QuantizationConfig(method="rtn", group_size=32), progress=False)
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(tiny_gpt2(ids).logits).all()  # works in memory
    with pytest.raises(HFCompressError, match=r"cannot save transformer\.h\.0\.attn\.c_attn .*Conv1D"):
        tiny_gpt2.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
