"""bitsandbytes backend: per-layer error bounds from the quantizers' math, the outlier threshold, block
size, and save -> plain ``from_pretrained`` reload in a process that never imports hfcompress."""

from __future__ import annotations

import copy
import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
from .conftest import run_clean_python, small_llama

from hfcompress.core.errors import ConfigError
from hfcompress.quantization.bnb import quantize_bnb
from hfcompress.quantization.saving import save_checkpoint

bnb = pytest.importorskip("bitsandbytes")

U16 = 2.0 ** -11  # float16 unit roundoff (bitsandbytes' int8 path runs activations in float16)


def bnb_config(method, **kw):
    return SimpleNamespace(method=method, **kw)


@pytest.fixture(scope="module")
def model():
    return small_llama(hidden=128, intermediate=256, vocab=320)


def layer_pair(model, quantized, name="model.layers.0.mlp.down_proj"):
    return model.get_submodule(name), quantized.get_submodule(name)


def int8_bound(x, w):
    """LLM.int8 vector-wise quantization (Dettmers et al. 2022, eq. 1-3): rows of W and of x are scaled by
    absmax/127 and rounded, so |dw| <= s_w/2, |dx| <= s_x/2 (+ float16 rounding of x), and
    |y - y64| <= s_x/2 sum|w| + s_w/2 sum|x| + K s_x s_w/4 + u16 (|y| + sum|x w|)."""
    x64, w64 = x.double(), w.double()
    s_x = x64.abs().amax(dim=1, keepdim=True) / 127  # (M, 1)
    s_w = w64.abs().amax(dim=1) / 127  # (N,)
    k = x.shape[1]
    y = x64 @ w64.t()
    bound = (s_x / 2) * w64.abs().sum(1) + (s_w / 2) * x64.abs().sum(1, keepdim=True) + k * s_x * s_w / 4
    return y, bound + U16 * (y.abs() + x64.abs() @ w64.abs().t()) + 1e-6


def test_int8_layer_within_bound_and_threshold_keeps_outliers(model):
    float_layer, _ = layer_pair(model, model)
    x = torch.randn(4, float_layer.in_features, generator=torch.Generator().manual_seed(0))
    x[:, 7] = 40.0  # an outlier feature column, as LLM.int8 observed in large models
    errors = {}
    for threshold in (0.0, 6.0):
        quantized = quantize_bnb(copy.deepcopy(model), bnb_config("bnb_int8", bnb_threshold=threshold))
        _, layer = layer_pair(model, quantized)
        assert isinstance(layer, bnb.nn.Linear8bitLt)
        with torch.no_grad():
            y = layer(x).double()
        reference, bound = int8_bound(x, float_layer.weight.data)
        assert ((y - reference).abs() <= bound).all()
        errors[threshold] = (y - reference).abs().mean()
    # The outlier column dominates absmax(x) and crushes the other columns to a few int8 levels; with the
    # threshold those columns are quantized on their own scale and the error drops a lot.
    assert errors[6.0] < 0.25 * errors[0.0]


@pytest.mark.parametrize("method", ["bnb_nf4", "bnb_fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_4bit_layer_within_bound(model, method, block_size):
    """Blockwise 4-bit (QLoRA, Dettmers et al. 2023): each block of ``block_size`` consecutive weights
    (row-major) is divided by its absmax and rounded to the nearest code of the data type's table, so
    |dw| <= absmax_block * (largest gap between codes) / 2. No double quantization here: absmax exact."""
    quantized = quantize_bnb(copy.deepcopy(model), bnb_config(method, bnb_double_quant=False, bnb_compute_dtype="float32",
                                               bnb_block_size=block_size))
    float_layer, layer = layer_pair(model, quantized)
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.blocksize == block_size and state.quant_type == method.removeprefix("bnb_")
    codes = state.code.double().sort().values
    half_gap = (codes[1:] - codes[:-1]).max() / 2
    w = float_layer.weight.data.double()  # (N, K)
    absmax = w.reshape(-1, block_size).abs().amax(dim=1).repeat_interleave(block_size).reshape(w.shape)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x).double()
    reference = x.double() @ w.t()
    bound = x.double().abs() @ (half_gap * absmax).t() + 1e-5
    assert ((y - reference).abs() <= bound).all()


def test_save_and_plain_reload_without_hfcompress(tmp_path, model):
    """int8, nf4 (double quant) and nf4 with block size 128 saved through save_checkpoint *after* a forward
    pass, reloaded by plain transformers in a fresh interpreter: same logits, block size preserved."""
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    cases = {
        "int8": bnb_config("bnb_int8", bnb_threshold=6.0),
        "nf4": bnb_config("bnb_nf4", bnb_double_quant=True, bnb_compute_dtype="float32", bnb_block_size=64),
        "nf4_b128": bnb_config("bnb_nf4", bnb_double_quant=False, bnb_compute_dtype="float32",
                               bnb_block_size=128),
    }
    expected = {}
    for name, config in cases.items():  # forward first: bitsandbytes' CPU repacking must not leak into the file
        quantized = quantize_bnb(copy.deepcopy(model), config)
        with torch.no_grad():
            expected[name] = quantized(tokens).logits
        save_checkpoint(quantized, tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())["quantization_config"][
            "quant_method"] == "bitsandbytes"
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        tokens = torch.tensor({tokens.tolist()})
        out = {{}}
        for name in {list(cases)}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name).eval()
            for module in model.modules():  # same (float32, generic) kernel as the in-memory model
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                out[name] = model(tokens).logits.contiguous()
            layer = model.model.layers[0].mlp.down_proj
            print(name, type(layer).__name__, getattr(getattr(layer.weight, "quant_state", None), "blocksize", None))
        save_file(out, {str(tmp_path / "logits.safetensors")!r})
        assert not any(m.startswith("hfcompress") for m in sys.modules), "hfcompress was imported"
    """)
    proc = run_clean_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines() if line.startswith(tuple(cases)))
    assert lines == {"int8": "Linear8bitLt None", "nf4": "Linear4bit 64", "nf4_b128": "Linear4bit 128"}
    from safetensors.torch import load_file

    reloaded = load_file(tmp_path / "logits.safetensors")
    for name in cases:
        assert torch.allclose(reloaded[name], expected[name], atol=1e-6, rtol=0), name


def test_ignore_patterns_keep_modules_float(model):
    quantized = quantize_bnb(copy.deepcopy(model), bnb_config("bnb_int8", ignore=["re:.*\\.0\\.mlp\\..*", "lm_head"]))
    assert type(quantized.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(quantized.model.layers[1].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert type(quantized.lm_head) is torch.nn.Linear
    # ignore=[] is explicit: the output head is quantized too
    everything = quantize_bnb(copy.deepcopy(model), bnb_config("bnb_int8", ignore=[]))
    assert isinstance(everything.lm_head, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("config,match", [
    (bnb_config("rtn"), "method must be one of"),
    (bnb_config("bnb_int8", bnb_threshold=-1.0), "bnb_threshold"),
    (bnb_config("bnb_nf4", bnb_compute_dtype="int8"), "bnb_compute_dtype"),
    (bnb_config("bnb_nf4", bnb_block_size=100), "bnb_block_size"),
])
def test_config_errors(model, config, match):
    with pytest.raises(ConfigError, match=match):
        quantize_bnb(copy.deepcopy(model), config)


def test_cpu_kernel_shape_error_names_layer():
    odd = small_llama(hidden=64, intermediate=160)  # down_proj K = 160: not a multiple of 64
    if not getattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU takes bitsandbytes' generic 4-bit path, which accepts any shape")
    with pytest.raises(ConfigError, match="model.layers.0.mlp.down_proj"):
        quantize_bnb(odd, bnb_config("bnb_nf4"))


def test_save_refuses_layers_repacked_by_bitsandbytes(tmp_path, model):
    """A 4-bit model whose CPU fast path repacked its weights cannot be written back exactly (bitsandbytes
    0.50): save_checkpoint refuses instead of writing a corrupted checkpoint."""
    from hfcompress.core.errors import HFCompressError

    quantized = quantize_bnb(copy.deepcopy(model), bnb_config("bnb_nf4", bnb_double_quant=False, bnb_compute_dtype="float32"))
    layer = quantized.model.layers[0].mlp.up_proj
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking")
    layer.support_avx512bf16_for_cpu = True  # what a plain from_pretrained model does on an AVX512-BF16 CPU
    with torch.no_grad():
        quantized(torch.zeros(1, 3, dtype=torch.long))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(HFCompressError, match="model.layers.0.mlp.up_proj"):
        save_checkpoint(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()
