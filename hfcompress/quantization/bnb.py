"""bitsandbytes backend: LLM.int8 (``bnb_int8``) and 4-bit NF4/FP4 (``bnb_nf4`` / ``bnb_fp4``).

Quantization goes through transformers' own bitsandbytes integration (its ``HfQuantizer``, the same steps
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` takes), in memory, on the loaded model. The
result is exactly what users get from transformers (``Linear8bitLt`` / ``Linear4bit`` modules, ``hf_quantizer`` set), so
``model.save_pretrained`` writes transformers' bitsandbytes serialization and a plain
``AutoModelForCausalLM.from_pretrained(dir)`` reloads it, on CPU (bitsandbytes >= 0.48) or CUDA.

References: LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339) — vector-wise int8 with fp16 outlier
columns above ``threshold``; QLoRA (Dettmers et al., 2023, arXiv:2305.14314) — NF4 data type, blockwise
absmax scales and double quantization of those scales.
"""

from __future__ import annotations

import logging
import re

import torch

from ..core.errors import ConfigError

logger = logging.getLogger(__name__)

BNB_METHODS = ("bnb_int8", "bnb_nf4", "bnb_fp4")
# bitsandbytes' default 4-bit block size; transformers' integration always quantizes with it.
DEFAULT_BLOCK_SIZE = 64
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def matches(name: str, pattern: str) -> bool:
    """Exact name, a dotted suffix (``lm_head`` matches ``model.lm_head``), or ``re:<regex>`` (full match),
    the ``ignore`` rule of QuantizationConfig."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def ignored_modules(model, patterns: list[str]) -> list[str]:
    """Names of the modules matched by ``ignore`` patterns, spelled out for ``llm_int8_skip_modules``
    (whose own matching differs: prefixes and substrings). An explicit list, even empty, also stops
    transformers from adding its default skips, so ``ignore=[]`` quantizes the output head too."""
    return [name for name, _ in model.named_modules() if name and any(matches(name, p) for p in patterns)]


def bnb_config_from(config, model=None):
    """Our QuantizationConfig (read by attribute) -> ``transformers.BitsAndBytesConfig``; with ``model``,
    ``config.ignore`` becomes the explicit list of modules kept in float."""
    from transformers import BitsAndBytesConfig

    method = getattr(config, "method", None)
    if method not in BNB_METHODS:
        raise ConfigError(f"quantize_bnb: method must be one of {', '.join(BNB_METHODS)}, got {method!r}")
    ignore = getattr(config, "ignore", None)
    skip = None if model is None or ignore is None else ignored_modules(model, list(ignore))
    if method == "bnb_int8":
        threshold = float(getattr(config, "bnb_threshold", 6.0))
        if threshold < 0:
            raise ConfigError(f"bnb_threshold must be >= 0 (0 disables outlier columns), got {threshold}")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip)
    compute = str(getattr(config, "bnb_compute_dtype", "float32")).replace("torch.", "")
    if compute not in COMPUTE_DTYPES:
        raise ConfigError(f"bnb_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute!r}")
    block_size = int(getattr(config, "bnb_block_size", DEFAULT_BLOCK_SIZE))
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"bnb_block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.removeprefix("bnb_"),
        bnb_4bit_use_double_quant=bool(getattr(config, "bnb_double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, compute),
        llm_int8_skip_modules=skip,
    )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def is_bnb_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def make_quantizer(bnb_config, device: torch.device):
    """transformers' own ``HfQuantizer`` for ``bnb_config`` (``Bnb4BitHfQuantizer`` / ``Bnb8BitHfQuantizer``),
    as ``from_pretrained(quantization_config=...)`` creates it for a float checkpoint (``pre_quantized=False``)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.validate_environment(device_map={"": str(device)})
    return quantizer


def quantize_bnb(model, config, rollback=None):
    """Quantize ``model`` with bitsandbytes in place and return it (see :func:`_quantize_bnb`). A failure
    half-way puts the original layers back (or marks the model unsaveable: :mod:`.rollback`)."""
    if rollback is not None:
        return _quantize_bnb(model, config, rollback)
    from .rollback import Rollback, choose_keep

    with Rollback(model, keep=choose_keep(model, bnb_bytes(model, config))) as rollback:
        _quantize_bnb(model, config, rollback)
    rollback.commit()
    return model


def bnb_bytes(model, config) -> int:
    """Bytes of the bitsandbytes weights ``config`` makes of ``model``'s linears (about; for the rollback)."""
    bits = 8 if getattr(config, "method", None) == "bnb_int8" else 4
    return sum(m.weight.numel() for m in model.modules() if _is_linear(m)) * bits // 8


@torch.no_grad()
def _quantize_bnb(model, config, rollback):
    """Quantize ``model`` (a transformers ``PreTrainedModel``) with bitsandbytes in place and return it.

    ``config`` is read by attribute: ``method`` ("bnb_int8", "bnb_nf4", "bnb_fp4"), ``bnb_threshold``
    (LLM.int8 outlier threshold), ``bnb_double_quant``, ``bnb_compute_dtype``, ``bnb_block_size`` (4-bit),
    optional ``ignore`` (module names kept in float; transformers also keeps the output head in float when
    ``ignore`` is not given). Unquantized parts keep the model's dtype.

    The steps are those of ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` on a float
    checkpoint, driven on the already-loaded model: the quantizer's ``preprocess_model`` swaps each linear for
    an empty (meta) ``Linear4bit``/``Linear8bitLt`` (``replace_with_bnb_linear``), its quantize operation
    (``Bnb4bitQuantize``/``Bnb8bitQuantize``) turns each original float weight into ``Params4bit``/
    ``Int8Params``, and ``postprocess_model`` sets ``config.quantization_config``; ``model.hf_quantizer`` is
    set as ``from_pretrained`` sets it. So ``save_pretrained`` writes transformers' bitsandbytes serialization.
    No temporary folder, no second copy of the model: each original layer is dropped once converted (or kept
    in ``rollback``, see :class:`.rollback.Rollback`, to be put back if a later one fails).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("bnb_* methods need bitsandbytes: pip install 'bitsandbytes>=0.48'") from exc
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"quantize_bnb needs a transformers PreTrainedModel, got {type(model).__name__}")
    bnb_config = bnb_config_from(config, model)
    device = _model_device(model)
    block_size = int(getattr(config, "bnb_block_size", DEFAULT_BLOCK_SIZE))
    quantizer = make_quantizer(bnb_config, device)
    was_training = model.training
    originals = {name: module for name, module in model.named_modules() if name and _is_linear(module)}
    rollback.on_undo(lambda: _remove_quantization(model, quantizer))
    quantizer.preprocess_model(model, dtype=model.dtype, device_map={"": str(device)})  # meta bnb modules
    converted = [name for name, module in model.named_modules() if is_bnb_linear(module)]
    for name in converted:
        rollback.replaced(name, originals[name])
    convert = quantizer.get_quantize_ops()
    for name in converted:
        module, source = model.get_submodule(name), originals.pop(name)  # the original is freed once done
        if bnb_config.load_in_4bit:
            # transformers always uses bitsandbytes' default block size; the quantize op builds Params4bit
            # from the empty parameter's attributes, so setting it there is all it takes.
            module.weight.blocksize = block_size
        key = f"{name}.weight"
        # The op transposes GPT-2's Conv1D weights itself (module.source_cls).
        module.weight = convert.convert({key: source.weight.detach()}, model=model, full_layer_name=key)[key]
        if source.bias is not None:
            module.bias = torch.nn.Parameter(source.bias.detach(), requires_grad=False)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    if bnb_config.load_in_4bit:
        _check_cpu_4bit_shapes(model, block_size)
        _keep_4bit_serializable(model)
    model.train(was_training)  # the new modules are created in training mode (LLM.int8 behaves differently)
    return model


def _remove_quantization(model, quantizer) -> None:
    """Undo what the quantizer's pre/postprocessing set on ``model`` (the layers are put back by the caller)."""
    quantizer.remove_quantization_config(model)
    for owner, attribute in ((model, "is_loaded_in_4bit"), (model, "is_loaded_in_8bit"),
                             (model.config, "_is_quantized")):
        if attribute in vars(owner):
            delattr(owner, attribute)


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _keep_4bit_serializable(model) -> None:
    """Keep bitsandbytes' CPU 4-bit layers in their serializable layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit weight at its first forward
    (``_convert_weight_packed_for_cpu``: absmax transposed and cast to bfloat16, double quantization undone)
    and its save-time inverse is only "best effort": without double quantization the absmax stays
    transposed (the reloaded model is wrong by O(1) in the logits) and with it the absmax is re-quantized
    from bfloat16. Quantize -> evaluate -> save, our normal flow, would therefore write a corrupted
    checkpoint. We switch the repacking off for the models we create (the generic dequantize path computes
    the same function); :func:`hfcompress.quantization.saving.save_checkpoint` refuses models already repacked.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _check_cpu_4bit_shapes(model, block_size: int) -> None:
    """bitsandbytes' fast CPU 4-bit path (taken when the CPU has AVX512-BF16) repacks each weight into
    blocks of 32 output rows and whole quantization blocks per row, and fails at the first forward for
    other shapes. Catch that now, naming the layer, instead of in the middle of generation."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            return
        if module.out_features % 32 or module.in_features % block_size:
            raise ConfigError(
                f"bitsandbytes' CPU 4-bit kernel cannot run layer {name!r} ({module.out_features}x"
                f"{module.in_features}): it needs out_features % 32 == 0 and in_features % bnb_block_size "
                f"({block_size}) == 0; add {name!r} to ignore or use another block size")
