"""Packed runtime: load a compressed-tensors ``pack-quantized`` checkpoint into modules that keep the
weights quantized in memory and multiply with PyTorch's native weight-only kernels.

``load_compressed(path_or_repo)`` builds the model skeleton from config.json on the meta device (the
float weights are never materialised), replaces every quantized Linear/Embedding by a packed module, and
loads the remaining tensors (embeddings, norms, unquantized heads) from the safetensors files.

Module choice per layer (CPU):

* ``Int4PackedLinear``: b <= 4 bits, on our ``hfcompress::int4_gemv`` (groups of a multiple of 32 or per
  channel, symmetric or asymmetric, any shape; see native.py), else on ``aten._weight_int4pack_mm_for_cpu``
  (N % 16 == 0 and group sizes it takes); the layers that miss our kernel are named in one warning;
* ``Int8PackedLinear``: per-channel/tensor weights of <= 8 bits (our ``hfcompress::int8_gemv``: AVX-512 VNNI,
  AVX-512 or AVX2, compiled on first use, see native.py; else ``aten._weight_int8pack_mm``, which needs
  K % 16 == 0; an asymmetric zero point adds a rank-one correction);
* ``DequantLinear``: everything else (int8 groups, odd shapes, activation-ordered ``g_idx``, devices other than
  CPU and CUDA) keeps the checkpoint's int32 words and dequantizes on the fly;
* ``PackedEmbedding``: quantized embeddings dequantize only the looked-up rows.

On CUDA, Linears use the modules of :mod:`.cuda_runtime` instead (tinygemm int4, int8 dequantized in the GEMM,
or a weight dequantized once at load).

Projections that read the same tensor (q/k/v, gate/up) share one kernel call over their concatenated
int8 weights (``fuse_projections``, on by default; the modules keep their names as ``SharedInputSlice``).
``quantize_embeddings=True`` additionally stores a float input embedding table as int8 rows (and a head tied to it
multiplies by those rows). ``compile_decode=True`` makes ``generate()`` decode with a static KV cache and a compiled
forward (:mod:`.decode`).

Activations run in ``dtype``. By default bfloat16 where the CPU multiplies it in hardware (AVX-512 BF16, AMX)
or our kernels are unavailable (PyTorch's int4/int8 kernels are much faster in bfloat16), and float32 where our
kernels run on a CPU without it (AVX2): they read float32 activations in place, and the rest of the model
(attention, norms) would otherwise run in emulated bfloat16, several times slower than float32.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.devices import resolve_device
from ..core.errors import ConfigError
from . import kernels
from ..core.native import (
    cpu_has_native_bf16,
    int4_gemv_available,
    int8_gemv_available,
)
from .cuda_runtime import build_cuda_linear, finish_cuda_model
from .ct_format import module_weight_args
from .decode import enable_compiled_decode
from .modules import CompressedLinear
from .checkpoint import (
    CheckpointError,
    TensorReader,
    check_zero_point,
    expected_ct_tensors,
    module_schemes,
    num_groups,
    parse_ct_config,
    quant_method,
    read_config,
    read_index,
    resolve_checkpoint,
    weight_dims,
)

from .packed import (  # the modules live in .packed (so .cuda_runtime can build on them); re-exported here
    FUSABLE_SIBLINGS,  # noqa: F401
    DequantLinear,
    Int4PackedLinear,
    Int8PackedLinear,
    Int8RowEmbedding,
    PackedEmbedding,
    PackedLinear,
    PackedModuleMixin,
    SharedInputProjections,
    SharedInputSlice,
    flatten_head_input,
    fuse_shared_input_projections,
    kernel_module,
    quantize_input_embeddings,
)

logger = logging.getLogger(__name__)

__all__ = ["load_compressed", "pack_compressed_linears", "PackedLinear", "Int4PackedLinear", "Int8PackedLinear", "DequantLinear",
           "PackedEmbedding", "SharedInputProjections", "SharedInputSlice", "fuse_shared_input_projections",
           "kernel_module", "Int8RowEmbedding", "quantize_input_embeddings"]


def _read_module_tensors(name: str, module: nn.Module, weights, reader: TensorReader) -> dict:
    """Read and check one quantized module's tensors -> dict(q_packed, scale (N, G), zero_point, g_idx, bias)."""
    n, k = weight_dims(module)
    groups = num_groups(k, weights)
    for tensor, (shape, dtypes) in expected_ct_tensors(name, module, weights).items():
        info = reader.infos.get(tensor)
        if info is None:
            raise CheckpointError(f"checkpoint is missing tensor {tensor!r} required by config.json's "
                                  f"quantization_config ({weights.num_bits}-bit {weights.strategy})")
        if tensor.endswith("weight_zero_point"):
            problem = check_zero_point(info, n, groups, weights.num_bits)
        elif info.dtype not in dtypes or (info.shape != shape and math.prod(info.shape) != math.prod(shape)):
            problem = (f"tensor {tensor!r} in {info.file.name} is {info.dtype} {list(info.shape)}, expected "
                       f"{'/'.join(sorted(dtypes))} {list(shape)} for a {weights.num_bits}-bit {weights.strategy} "
                       f"scheme on a ({n}, {k}) weight")
        else:
            problem = None
        if problem:
            raise CheckpointError(problem)
    stored_shape = reader.get(f"{name}.weight_shape").tolist()
    if stored_shape != [n, k]:
        raise CheckpointError(f"tensor {name + '.weight_shape'!r} says {stored_shape}, but config.json's model has "
                              f"a ({n}, {k}) weight there")
    scale = reader.get(f"{name}.weight_scale")
    scale = scale.reshape(1, 1).expand(n, 1) if weights.strategy == "tensor" else scale.reshape(n, groups)
    if not torch.isfinite(scale).all():
        raise CheckpointError(f"tensor {name + '.weight_scale'!r} has non-finite values (corrupted checkpoint)")
    zero_point = None
    if not weights.symmetric:
        zero_point = kernels.unpack_zero_point(reader.get(f"{name}.weight_zero_point"), weights.num_bits, n)
        zero_point = zero_point.reshape(1, 1).expand(n, 1) if weights.strategy == "tensor" else zero_point.reshape(n, -1)
    g_idx = reader.get(f"{name}.weight_g_idx") if f"{name}.weight_g_idx" in reader else None
    bias = reader.get(f"{name}.bias") if getattr(module, "bias", None) is not None else None
    return dict(packed=reader.get(f"{name}.weight_packed"), scale=scale, zero_point=zero_point, g_idx=g_idx,
                bias=bias, shape=(n, k))


def compressed_linear_tensors(module: CompressedLinear) -> dict:
    """What :func:`_read_module_tensors` reads from a checkpoint, taken from a :class:`CompressedLinear` in
    memory: it holds the very tensors ``save_pretrained`` would write (``weight_packed``, ``weight_scale``,
    packed ``weight_zero_point``), so the packed module built from either is the same."""
    n, k = module.out_features, module.in_features
    zero_point = None
    if not module.symmetric:
        zero_point = kernels.unpack_zero_point(module.weight_zero_point, module.bits, n).reshape(n, -1)
    bias = None if module.bias is None else module.bias.detach()
    return dict(packed=module.weight_packed, scale=module.weight_scale, zero_point=zero_point, g_idx=None,
                bias=bias, shape=(n, k))


def build_packed_module(name: str, module: nn.Module, weights, reader: TensorReader, dtype: torch.dtype,
                        device: torch.device) -> nn.Module:
    """The packed replacement for one quantized Linear/Embedding of a checkpoint (see the module docstring)."""
    t = _read_module_tensors(name, module, weights, reader)
    if isinstance(module, nn.Embedding):
        n, k = t["shape"]
        group_size = weights.group_size if weights.strategy == "group" else None
        return PackedEmbedding(t["packed"], weights.num_bits, t["scale"], t["zero_point"], group_size, dtype,
                               (n, k), padding_idx=module.padding_idx)
    return packed_linear(name, t, weights, dtype, device)


def packed_linear(name: str, t: dict, weights, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The packed module for one quantized Linear from its tensors ``t`` (:func:`_read_module_tensors` or
    :func:`compressed_linear_tensors`) and compressed-tensors ``QuantizationArgs`` ``weights``."""
    n, k = t["shape"]
    bits = weights.num_bits
    group_size = weights.group_size if weights.strategy == "group" else None
    if device.type == "cuda":  # the GPU's kernels (tinygemm int4, int8 in the GEMM)
        return build_cuda_linear(name, t, weights, dtype, device)
    native = device.type == "cpu" and t["g_idx"] is None
    if native and bits <= 4:
        ours = int4_gemv_available() and kernels.int4_native_supports(k, group_size)
        kernel_group = None if ours else kernels.int4_kernel_group_size(n, k, group_size)
        if ours or kernel_group is not None:
            q = kernels.unpack_weight(t["packed"], bits, (n, k))
            return Int4PackedLinear(q, t["scale"], t["zero_point"], group_size, t["bias"], dtype, kernel_group)
    if native and group_size is None and kernels.int8_kernel_supports(k):
        q = kernels.unpack_weight(t["packed"], bits, (n, k))
        return Int8PackedLinear(q, t["scale"], t["zero_point"], t["bias"], dtype)
    logger.debug("%s: %d-bit %s weight (%d, %d) runs through the dequantize fallback", name, bits,
                 weights.strategy, n, k)
    zero = None if t["zero_point"] is None else t["zero_point"].to(torch.int8)
    return DequantLinear(t["packed"], bits, t["scale"], zero, group_size, t["g_idx"], t["bias"], dtype, (n, k))


# ------------------------------------------------------------------------------------------------------
# load_compressed
# ------------------------------------------------------------------------------------------------------
def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ConfigError(f"load_compressed: unknown dtype {dtype!r}; use bfloat16, float16 or float32")
        dtype = value
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"load_compressed: dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def _default_cpu_dtype() -> torch.dtype:
    """bfloat16, or float32 where our kernels run on a CPU without native bfloat16 (see the module docstring)."""
    return torch.float32 if int8_gemv_available() and not cpu_has_native_bf16() else torch.bfloat16


def _not_compressed_error(folder, method) -> CheckpointError:
    if method is None:
        return CheckpointError(f"{str(folder)!r} is a plain (unquantized) checkpoint: config.json has no "
                               "quantization_config; load it with transformers' from_pretrained")
    if method == "bitsandbytes":
        return CheckpointError(f"{str(folder)!r} is a bitsandbytes checkpoint; load it with "
                               "AutoModelForCausalLM.from_pretrained (bitsandbytes installed)")
    return CheckpointError(f"{str(folder)!r} uses quant_method {method!r}; load_compressed reads "
                           "'compressed-tensors' pack-quantized checkpoints")


def _build_skeleton(folder, dtype, trust_remote_code):
    """The model from config.json with parameters on the meta device (buffers such as RoPE tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}/config.json: cannot build a model config: {first}") from exc
    # The skeleton is a plain float model; the packed modules replace what the quantization_config targets.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{folder}/config.json: not a causal language model: {first}") from exc
    return model


def _tie_missing(model: nn.Module, missing: set[str]) -> set[str]:
    """Tie weights the checkpoint omits because config.json declares them shared (e.g. lm_head = embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        for dst, src in ((target, source), (source, target)):
            if dst in missing and src not in missing:
                parent, _, attr = dst.rpartition(".")
                src_parent, _, src_attr = src.rpartition(".")
                src_module, dst_module = model.get_submodule(src_parent), model.get_submodule(parent)
                if isinstance(src_module, PackedModuleMixin) or isinstance(dst_module, PackedModuleMixin):
                    continue
                setattr(dst_module, attr, getattr(src_module, src_attr))
                missing.discard(dst)
    return missing


def load_compressed(path_or_repo: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, *, trust_remote_code: bool = False,
                    progress: bool = True, fuse_projections: bool = True, quantize_embeddings: bool = False,
                    compile_decode: bool = False):
    """Load a compressed-tensors ``pack-quantized`` checkpoint (ours or llm-compressor's) for inference
    with weights kept packed.

    Args:
        path_or_repo: a local checkpoint folder or a Hugging Face Hub repo id (downloaded with
            ``huggingface_hub.snapshot_download``; safetensors/json/tokenizer files only).
        device: where to run: "cpu" (default) uses the native int4/int8 kernels; "cuda" (or "cuda:N", "auto")
            PyTorch's tinygemm int4 kernel and int8 dequantized inside the GEMM (see ``cuda_runtime``); other
            devices the dequantize-on-the-fly fallback. A device this machine lacks raises ConfigError.
        dtype: activation and unquantized-weight dtype; by default bfloat16, or float32 on CPUs without native
            bfloat16 arithmetic when our kernels run (see the module docstring).
        fuse_projections: let projections that read the same input (q/k/v, gate/up) share one kernel call
            over their concatenated weights (:func:`fuse_shared_input_projections`); same results, faster
            decode. The modules keep their names and places in the model.
        quantize_embeddings: also quantize a floating-point input embedding table, here at load time, to
            int8 with one scale per row (:class:`Int8RowEmbedding`): ~half the memory of a bfloat16 table,
            and decode reads one row of it per token, so speed is unchanged. Off by default because it
            goes beyond what the checkpoint stores. (A checkpoint whose embeddings are already quantized
            loads them packed either way.) On CPU a table tied to the output head is quantized once for both, and
            the head multiplies on the int8 kernel (:func:`.packed.quantize_input_embeddings`).
        compile_decode: let ``generate()`` decode with a static KV cache and a ``torch.compile``'d forward
            (transformers' own static cache and automatic compile, switched on; see :mod:`.decode`): Inductor
            fuses each layer's norms, rotary, cache update and residuals around our kernels, which removes most of
            the per-token Python and dispatch cost of eager decoder layers (the larger share of a small model's
            decode step). The first ``generate`` pays the compile (one to three minutes, once per process),
            so it is off by default; if compiling fails, decode runs eagerly with one warning. The compiled
            step does not re-check the model's modules at every call (:func:`.decode.skip_module_guards`):
            load the model again rather than changing its modules after the first ``generate``.

    Returns the ``PreTrainedModel`` in eval mode; ``generate()`` works as usual. Raises
    :class:`~hfcompress.quantization.checkpoint.CheckpointError` (one line, naming the file/tensor) for a folder
    that is not such a checkpoint, tensors that do not match config.json, corrupted files or unsupported
    schemes; it never falls back to an unquantized load.
    """
    folder = resolve_checkpoint(path_or_repo)
    config = read_config(folder)
    method = quant_method(config)
    if method != "compressed-tensors":
        raise _not_compressed_error(folder, method)
    qconfig = parse_ct_config(config["quantization_config"])
    device = resolve_device(device)
    if dtype is None and device.type == "cpu":
        dtype = _default_cpu_dtype()
    dtype = _resolve_dtype(dtype)
    infos = read_index(folder)
    model = _build_skeleton(folder, dtype, trust_remote_code)

    schemes = module_schemes(model, qconfig)
    stored = {name.removesuffix(".weight_packed") for name in infos if name.endswith(".weight_packed")}
    for name in sorted(set(schemes) - stored):
        raise CheckpointError(f"config.json's quantization_config targets module {name!r}, but the checkpoint "
                              f"has no {name + '.weight_packed'!r}")
    for name in sorted(stored - set(schemes)):
        raise CheckpointError(f"tensor {name + '.weight_packed'!r} is in the checkpoint, but config.json's "
                              f"quantization_config does not target a Linear/Embedding named {name!r}")

    consumed: set[str] = set()
    with TensorReader(infos) as reader:
        for name, scheme in tqdm(schemes.items(), desc="Loading packed weights", disable=not progress):
            module = model.get_submodule(name)
            model.set_submodule(name, build_packed_module(name, module, scheme.weights, reader, dtype, device))
            consumed.update(t for t in infos if t.startswith(name + ".") and t.count(".") == name.count(".") + 1)
        state = {}
        for tensor_name in infos:
            if tensor_name in consumed:
                continue
            tensor = reader.get(tensor_name)
            state[tensor_name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        first = sorted(result.unexpected_keys)[0]
        raise CheckpointError(f"tensor {first!r} ({infos[first].file.name}) does not belong to the "
                              f"{type(model).__name__} that config.json describes ({len(result.unexpected_keys)} "
                              "such tensors)")
    still_meta = {n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta}
    missing = _tie_missing(model, still_meta)
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {sorted(missing)[0]!r} ({len(missing)} missing)")
    finish_packed_model(model, device, fuse_projections, quantize_embeddings)
    _load_generation_config(model, folder)
    if compile_decode:
        enable_compiled_decode(model)
    return model


def finish_packed_model(model: nn.Module, device: torch.device, fuse_projections: bool = True,
                        quantize_embeddings: bool = False) -> nn.Module:
    """Once every quantized layer is a packed module: warn about slow int4 layers, share kernel calls between
    projections of one input, finish the CUDA modules, optionally int8 the input embeddings; eval mode."""
    if device.type == "cpu":
        _warn_int4_fallbacks(model)
    if fuse_projections:
        fuse_shared_input_projections(model)
    if device.type == "cuda":
        finish_cuda_model(model)
    if quantize_embeddings:
        quantize_input_embeddings(model, tied_head=device.type == "cpu")
    if device.type == "cpu":
        flatten_head_input(model)
    model.to(device).eval().requires_grad_(False)
    return model


def pack_compressed_linears(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None,
                            fuse_projections: bool = True, quantize_embeddings: bool = False,
                            progress: bool = False) -> nn.Module:
    """Replace, in place, every :class:`CompressedLinear` of a model quantized in memory (``quantize``, or
    ``from_pretrained(..., quantization_config=HFCompressConfig(...))``) by the packed module
    :func:`load_compressed` would build from the checkpoint ``save_pretrained`` writes of it; then
    :func:`finish_packed_model`. The CompressedLinear buffers are freed as each layer is packed."""
    device = resolve_device(device)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, CompressedLinear)]
    for name, module in tqdm(layers, desc="Packing weights", disable=not progress):
        packed = packed_linear(name, compressed_linear_tensors(module), module_weight_args(module), dtype, device)
        model.set_submodule(name, packed)
    return finish_packed_model(model, device, fuse_projections, quantize_embeddings)


def _warn_int4_fallbacks(model: nn.Module) -> None:
    """One warning naming the <= 4-bit layers our int4 kernel does not take (while it runs for others)."""
    if not int4_gemv_available():
        return  # native.py already said why, once
    slower = [name for name, m in model.named_modules()
              if (isinstance(m, Int4PackedLinear) and m.backend != "hfcompress")
              or (isinstance(m, DequantLinear) and m.num_bits <= 4)]
    if slower:
        shown = ", ".join(slower[:5]) + (f" and {len(slower) - 5} more" if len(slower) > 5 else "")
        logger.warning("%d int4 layer(s) run on slower kernels (PyTorch's int4pack or dequantize-per-call): %s. "
                       "hfcompress's int4 kernel takes groups of a multiple of 32 or per-channel scales, without "
                       "activation-order g_idx", len(slower), shown)


def _load_generation_config(model, folder) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring %s/generation_config.json: %s", folder, exc)
