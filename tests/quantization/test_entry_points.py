"""Every entry point writes what it says, for every kind of method: the Python API (``quantize`` then
``save_pretrained``), ``hfcompress quantize``, a recipe's quantize stage and ``scripts/quantize.py``.

Each output is read back from disk, not from the objects that wrote it: config.json's ``quant_method``, the
dtypes of the stored tensors (uint8 / int8 / packed int32 for the integer formats, bfloat16 for a cast), bytes
that differ from the source's, and a reload with plain ``AutoModelForCausalLM.from_pretrained`` whose logits
match the model quantized in memory by the API (the reference of every entry point). The bug this guards
against: bitsandbytes quantization through the CLI wrote the source weights unchanged.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig

ROOT = Path(__file__).resolve().parents[2]
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 257, 300, 7, 11, 13]])
LAYER = "model.layers.0.mlp.up_proj"

# method -> (QuantizationConfig fields, config.json quant_method, dtype of LAYER's stored weight tensor)
CASES = {
    "bnb_nf4": (dict(method="bnb_nf4", bnb_compute_dtype="float32"), "bitsandbytes", ("weight", "U8")),
    "bnb_int8": (dict(method="bnb_int8"), "bitsandbytes", ("weight", "I8")),
    "rtn": (dict(method="rtn", bits=4, group_size=32), "compressed-tensors", ("weight_packed", "I32")),
    "gptq": (dict(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=64), "compressed-tensors",
             ("weight_packed", "I32")),
    "cast": (dict(method="cast", dtype="bfloat16"), None, ("weight", "BF16")),
}
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, calibration_texts):
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text("\n\n".join(calibration_texts))
    return path


@pytest.fixture(scope="module")
def reference_logits(tiny_reference_dir, calibration_file, tiny_tokenizer):
    """Logits of the model each method's API quantizes in memory (computed once per method)."""
    cache = {}

    def get(method):
        if method not in cache:
            fields = CASES[method][0]
            model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()
            data = str(calibration_file) if method == "gptq" else None
            result = quantize(model, QuantizationConfig(**fields), calibration_data=data,
                              tokenizer=tiny_tokenizer, progress=False)
            assert result is model  # the contract: in place, the same object back
            cache[method] = _logits(model)
        return cache[method]

    return get


_FLOAT: dict = {}


def float_logits(source: Path) -> torch.Tensor:
    if source not in _FLOAT:
        _FLOAT[source] = _logits(AutoModelForCausalLM.from_pretrained(source).eval())
    return _FLOAT[source]


def _logits(model) -> torch.Tensor:
    for module in model.modules():  # bitsandbytes: the same generic CPU kernel on both sides
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _tensors(folder: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (safetensors dtype tag, raw bytes) of every tensor in the folder's safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                sliced = f.get_slice(name)
                out[name] = (sliced.get_dtype(), f.get_tensor(name).contiguous().view(-1).view(torch.uint8)
                             .numpy().tobytes() if f.get_tensor(name).numel() else b"")
    return out


def check_written(out: Path, source: Path, method: str, expected: torch.Tensor) -> None:
    fields, quant_method, (suffix, dtype) = CASES[method]
    config = json.loads((out / "config.json").read_text())
    assert (config.get("quantization_config") or {}).get("quant_method") == quant_method
    written, original = _tensors(out), _tensors(source)
    assert written[f"{LAYER}.{suffix}"][0] == dtype
    source_weight = original[f"{LAYER}.weight"]
    assert written.get(f"{LAYER}.weight") != source_weight  # not the source's bytes
    changed = [n for n in original if n.endswith(".weight") and written.get(n) != original[n]]
    assert len(changed) >= 7  # every decoder linear of layer 0 at least
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    got = _logits(reloaded)
    scale = expected.abs().max()
    # A cast model reloads with its rotary tables recomputed in float32 (model.to() casts them to bfloat16
    # in memory): equal up to bfloat16 rounding. The other formats decompress to the very same weights.
    tolerance = 2 * torch.finfo(torch.bfloat16).eps if method == "cast" else 1e-4
    assert (got - expected).abs().max() <= tolerance * scale, method
    assert (got - float_logits(source)).abs().max() > 1e-3 * scale  # it really is another (quantized) model


def _args(method: str, style: str) -> list[str]:
    fields = CASES[method][0]
    out = []
    for key, value in fields.items():
        flag = "--" + (key.replace("_", "-") if style == "dash" else key)
        out += [flag, str(value)]
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_python_api(tmp_path, method, tiny_reference_dir, tiny_tokenizer, calibration_file, reference_logits):
    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()
    data = str(calibration_file) if method == "gptq" else None
    quantize(model, QuantizationConfig(**CASES[method][0]), calibration_data=data, tokenizer=tiny_tokenizer,
             progress=False)
    model.save_pretrained(tmp_path / "out")
    check_written(tmp_path / "out", tiny_reference_dir, method, reference_logits(method))


@pytest.mark.parametrize("method", list(CASES))
def test_cli(tmp_path, method, tiny_reference_dir, calibration_file, reference_logits):
    from hfcompress.cli import main

    code = main(["quantize", str(tiny_reference_dir), str(tmp_path / "out"), "-q",
                 "--calibration-data", str(calibration_file), *_args(method, "dash")])
    assert code == 0
    check_written(tmp_path / "out", tiny_reference_dir, method, reference_logits(method))
    card = (tmp_path / "out" / "README.md").read_text()
    bits = {"bnb_nf4": "4-bit", "bnb_int8": "8-bit", "rtn": "4-bit", "gptq": "4-bit", "cast": "bfloat16"}[method]
    assert bits in card.splitlines()[next(i for i, line in enumerate(card.splitlines()) if line.startswith("# "))]


@pytest.mark.parametrize("method", list(CASES))
def test_recipe_stage(tmp_path, method, tiny_reference_dir, calibration_file, reference_logits):
    import yaml

    from hfcompress.runs.recipe import load_recipe
    from hfcompress.runs.runner import run_recipe

    stage = {**CASES[method][0], "calibration_data": str(calibration_file)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "entry", "model": str(tiny_reference_dir),
                                      "stages": [{"quantize": stage}]}))
    # A recipe may only name a run folder below where it runs: this one is chosen as `hfcompress run --output` does.
    run_dir = Path(run_recipe(load_recipe(recipe), output=tmp_path / "run", progress=False))
    [out] = [p.parent for p in run_dir.glob("*/config.json")]
    check_written(out, tiny_reference_dir, method, reference_logits(method))


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_int8", "rtn", "gptq", "cast"])
def test_script(tmp_path, method, tiny_reference_dir, calibration_file, reference_logits):
    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up there
    try:
        spec.loader.exec_module(script)
    finally:
        sys.modules.pop(spec.name, None)
    code = script.main(["--model", str(tiny_reference_dir), "--output", str(tmp_path / "out"),
                        "--calibration_data", str(calibration_file), *_args(method, "underscore")])
    assert code == 0
    check_written(tmp_path / "out", tiny_reference_dir, method, reference_logits(method))


def test_bnb_in_place_matches_from_pretrained(tiny_reference_dir):
    """The in-memory bitsandbytes path gives exactly what transformers' own load-time quantization gives."""
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()
    quantize(model, QuantizationConfig(method="bnb_nf4", bnb_compute_dtype="float32", bnb_double_quant=True),
             progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_reference_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]), device_map={"": "cpu"}).eval()
    assert type(model.hf_quantizer) is type(loaded.hf_quantizer)
    assert model.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    assert model.is_quantized and getattr(model, "is_loaded_in_4bit", False)
    mine, theirs = model.get_submodule(LAYER).weight, loaded.get_submodule(LAYER).weight
    assert torch.equal(mine.data, theirs.data)
    assert torch.equal(mine.quant_state.absmax, theirs.quant_state.absmax)
    assert not model.training and not any(m.training for m in model.modules())
    torch.testing.assert_close(_logits(model), _logits(loaded), rtol=0, atol=0)
