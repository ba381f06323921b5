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
* ``DequantLinear``: everything else (int8 groups, odd shapes, activation-ordered ``g_idx``, non-CPU devices)
  keeps the checkpoint's int32 words and dequantizes on the fly;
* ``PackedEmbedding``: quantized embeddings dequantize only the looked-up rows.

Projections that read the same tensor (q/k/v, gate/up) share one kernel call over their concatenated
int8 weights (``fuse_projections``, on by default; the modules keep their names as ``SharedInputSlice``).
``quantize_embeddings=True`` additionally stores a float input embedding table as int8 rows.

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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, HFCompressError
from . import kernels
from ..core.native import (
    cpu_has_native_bf16,
    int4_gemv_available,
    int4_gemv_op,
    int8_gemv_available,
    int8_gemv_op,
    kernel_isa,
)
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

logger = logging.getLogger(__name__)

__all__ = ["load_compressed", "PackedLinear", "Int4PackedLinear", "Int8PackedLinear", "DequantLinear",
           "PackedEmbedding", "SharedInputProjections", "SharedInputSlice", "fuse_shared_input_projections",
           "kernel_module", "Int8RowEmbedding", "quantize_input_embeddings"]


class PackedModuleMixin:
    """Shared behaviour: logical parameter count, and refusing to be saved as if it were a float model."""

    def logical_num_parameters(self) -> int:
        bias = getattr(self, "bias", None)
        return self.out_features * self.in_features + (bias.numel() if bias is not None else 0)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Our kernel layouts are not the compressed-tensors layout: saving them would write a checkpoint
        # that plain from_pretrained loads as random float weights. Refuse instead.
        raise HFCompressError(f"module {prefix.rstrip('.')!r} comes from load_compressed() and is inference-only; "
                              "copy the original checkpoint folder instead of saving this model")


class PackedLinear(PackedModuleMixin, nn.Module):
    """A Linear whose weight stays quantized; subclasses implement ``_matmul`` and ``dequantized_weight``."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # (M, K)
        y = self._matmul(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (N, K) this module multiplies by (for tests and debugging)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4PackedLinear(PackedLinear):
    """<= 4-bit weights, two codes per byte, with per-group scales (and zero points).

    Runs on hfcompress's ``int4_gemv`` (native.py; codes repacked at load into its layout, groups of any
    multiple of 32 or per channel) when the native kernels are available, else on PyTorch's
    ``aten._weight_int4pack_mm_for_cpu`` (its layout; ``kernel_group_size`` from
    :func:`kernels.int4_kernel_group_size`, computed when not given)."""

    def __init__(self, q, scale, zero_point, group_size, bias, dtype, kernel_group_size=None):
        n, k = q.shape
        super().__init__(k, n, bias, dtype)
        self.group_size = group_size
        if int4_gemv_available() and kernels.int4_native_supports(k, group_size):
            self.backend = "hfcompress"
            self.kernel_group_size = k if group_size is None or group_size >= k else group_size
            packed, scale32, offset = kernels.pack_int4_native(q, scale, zero_point)
            self.register_buffer("weight_int4", packed)  # (ceil(N/4), ceil(K/64), 4, 32) uint8
            self.register_buffer("weight_scale", scale32)  # (N, G)
            self.register_buffer("weight_offset", offset)  # (N, G) (8 + z) s, or None
            return
        self.backend = "int4pack"
        kernel_group_size = kernel_group_size or kernels.int4_kernel_group_size(n, k, group_size)
        if kernel_group_size is None:
            raise ValueError(f"int4 weight ({n}, {k}) with group size {group_size} fits neither kernel")
        self.kernel_group_size = kernel_group_size
        packed, scales_and_zeros = kernels.pack_int4_cpu(q, scale, zero_point, group_size, kernel_group_size, dtype)
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/g, N, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode's fast path (see Int8PackedLinear.forward): one call, no generic reshapes.
        if (self.backend == "hfcompress" and x.dtype is self.compute_dtype and self.bias is None
                and x.numel() == self.in_features and x.dtype in (torch.float32, torch.bfloat16)):
            y = int4_gemv_op()(x.reshape(1, self.in_features), self.weight_int4, self.weight_scale,
                               self.weight_offset, self.out_features, self.kernel_group_size, kernel_isa())
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def _matmul(self, x):
        if self.backend == "hfcompress":
            return kernels.int4_matmul_native(x, self.weight_int4, self.weight_scale, self.weight_offset,
                                              self.out_features, self.kernel_group_size)
        return kernels.int4_matmul_cpu(x, self.weight_int4pack, self.kernel_group_size, self.scales_and_zeros)

    @classmethod
    def concatenate(cls, members: list["Int4PackedLinear"]) -> "Int4PackedLinear | None":
        """One module computing every member's output side by side (our layout only: whole blocks of 4 rows
        and the same groups), or None when they cannot share a call."""
        first = members[0]
        if any(m.backend != "hfcompress" or m.out_features % 4 or m.kernel_group_size != first.kernel_group_size
               or (m.bias is None) != (first.bias is None)
               or (m.weight_offset is None) != (first.weight_offset is None) for m in members):
            return None
        fused = cls.__new__(cls)
        PackedLinear.__init__(fused, first.in_features, sum(m.out_features for m in members),
                              None if first.bias is None else torch.cat([m.bias for m in members]),
                              first.compute_dtype)
        fused.group_size, fused.backend = first.group_size, "hfcompress"
        fused.kernel_group_size = first.kernel_group_size
        fused.register_buffer("weight_int4", torch.cat([m.weight_int4 for m in members]))
        fused.register_buffer("weight_scale", torch.cat([m.weight_scale for m in members]))
        fused.register_buffer("weight_offset", None if first.weight_offset is None
                              else torch.cat([m.weight_offset for m in members]))
        return fused

    def dequantized_weight(self):
        # The layout is opaque; multiplying the identity reads W.T back out exactly (one product per entry).
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)
        return self._matmul(eye).t().contiguous()

    def extra_repr(self):
        kernel = "int4_gemv" if self.backend == "hfcompress" else "int4pack"
        return super().extra_repr() + f", kernel={kernel}, group_size={self.kernel_group_size}"


class Int8PackedLinear(PackedLinear):
    """Per-channel int8 weights (N, K) + float32 scale (N,) for hfcompress's int8 kernel (native.py), or
    ``aten._weight_int8pack_mm`` where that kernel cannot be built."""

    def __init__(self, q, scale, zero_point, bias, dtype):
        n, k = q.shape
        super().__init__(k, n, bias, dtype)
        scale = scale.reshape(n).to(torch.float32)
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale)
        zero_scale = None if zero_point is None else zero_point.reshape(n).to(torch.float32) * scale
        self.register_buffer("zero_scale", zero_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode's fast path: one token through our kernel with no Python work beyond the call (the generic
        # path's reshapes, conversions and kernel choice cost about as much as the kernel on small layers).
        if (x.dtype is self.compute_dtype and x.device.type == "cpu" and self.bias is None
                and self.zero_scale is None and x.numel() == self.in_features and int8_gemv_available()):
            y = int8_gemv_op()(x.reshape(1, self.in_features), self.weight_int8, self.weight_scale, kernel_isa())
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def _matmul(self, x):
        return kernels.int8_matmul(x, self.weight_int8, self.weight_scale, self.zero_scale)

    @classmethod
    def concatenate(cls, members: list["Int8PackedLinear"]) -> "Int8PackedLinear | None":
        """One module computing every member's output side by side, or None when they cannot share a call."""
        first = members[0]
        if any((m.bias is None) != (first.bias is None) or (m.zero_scale is None) != (first.zero_scale is None)
               for m in members):
            return None
        fused = cls.__new__(cls)
        PackedLinear.__init__(fused, first.in_features, sum(m.out_features for m in members),
                              None if first.bias is None else torch.cat([m.bias for m in members]),
                              first.compute_dtype)
        fused.register_buffer("weight_int8", torch.cat([m.weight_int8 for m in members]))
        fused.register_buffer("weight_scale", torch.cat([m.weight_scale for m in members]))
        fused.register_buffer("zero_scale", None if first.zero_scale is None
                              else torch.cat([m.zero_scale for m in members]))
        return fused

    def dequantized_weight(self):
        w = self.weight_int8.to(torch.float32) * self.weight_scale.to(torch.float32)[:, None]
        if self.zero_scale is not None:
            w = w - self.zero_scale.to(torch.float32)[:, None]
        return w.to(self.compute_dtype)

    def extra_repr(self):
        return super().extra_repr() + (", kernel=int8_gemv" if int8_gemv_available() else ", kernel=int8pack")


class DequantLinear(PackedLinear):
    """Any b-bit scheme: keeps the checkpoint's packed int32 words, dequantizes per forward."""

    def __init__(self, packed, num_bits, scale, zero_point, group_size, g_idx, bias, dtype, shape):
        n, k = shape
        super().__init__(k, n, bias, dtype)
        self.num_bits, self.group_size = num_bits, group_size
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale.to(dtype))
        self.register_buffer("weight_zero_point", zero_point)
        self.register_buffer("weight_g_idx", g_idx)

    def dequantized_weight(self):
        q = kernels.unpack_weight(self.weight_packed, self.num_bits, (self.out_features, self.in_features))
        return kernels.dequantize(q, self.weight_scale, self.weight_zero_point, self.group_size,
                                  self.weight_g_idx, dtype=self.compute_dtype)

    def _matmul(self, x):
        return F.linear(x, self.dequantized_weight())

    def extra_repr(self):
        return super().extra_repr() + f", kernel=dequantize, bits={self.num_bits}, group_size={self.group_size}"


class PackedEmbedding(PackedModuleMixin, nn.Module):
    """A quantized embedding table: only the looked-up rows are unpacked and dequantized."""

    def __init__(self, packed, num_bits, scale, zero_point, group_size, dtype, shape, padding_idx=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.out_features, self.in_features = shape  # for logical_num_parameters
        self.num_bits, self.group_size, self.compute_dtype = num_bits, group_size, dtype
        self.padding_idx = padding_idx
        self.register_buffer("weight_packed", packed)  # (V, words)
        self.register_buffer("weight_scale", scale.to(dtype))  # (V, G)
        self.register_buffer("weight_zero_point", zero_point)  # (V, G) int8 or None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        q = kernels.unpack_weight(self.weight_packed[ids], self.num_bits, (ids.numel(), self.embedding_dim))
        zero = None if self.weight_zero_point is None else self.weight_zero_point[ids]
        rows = kernels.dequantize(q, self.weight_scale[ids], zero, self.group_size, dtype=self.compute_dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.num_bits}, group_size={self.group_size}"


class Int8RowEmbedding(PackedModuleMixin, nn.Module):
    """An embedding table quantized at load time (``load_compressed(..., quantize_embeddings=True)``):
    int8 codes with one float32 scale per row (symmetric, round to nearest), dequantizing only the rows
    looked up. Each entry is within half a quantization step (max|row| / 254) of the float value it
    replaces."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, padding_idx=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_features, self.in_features = weight.shape  # for logical_num_parameters
        self.compute_dtype, self.padding_idx = dtype, padding_idx
        w = weight.detach().to(torch.float32)
        scale = w.abs().amax(dim=1) / 127  # (V,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids].to(torch.float32) * self.weight_scale[input_ids].unsqueeze(-1)
        return rows.to(self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight_int8.to(torch.float32) * self.weight_scale[:, None]).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, per-row scales (quantized at load)"


def quantize_input_embeddings(model: nn.Module) -> bool:
    """Replace the model's float input embedding table by an :class:`Int8RowEmbedding`. Skipped, with a
    warning, when the table is shared with another module (tied output head), whose float weight it is."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return False
    weight = embedding.weight
    shared_with = [name for name, module in model.named_modules()
                   if module is not embedding and getattr(module, "weight", None) is weight]
    if shared_with:
        logger.warning("quantize_embeddings: the input embedding table is tied to %s; keeping it in floating "
                       "point (quantize that head in the checkpoint to save its memory)", ", ".join(shared_with))
        return False
    model.set_input_embeddings(Int8RowEmbedding(weight, weight.dtype if weight.is_floating_point() else
                                                torch.float32, embedding.padding_idx))
    return True


# ------------------------------------------------------------------------------------------------------
# Projections that read the same input share one kernel call
# ------------------------------------------------------------------------------------------------------
# Sibling linears that a block always calls on the same tensor: attention's query/key/value projections and
# a gated MLP's gate/up projections (Llama, Mistral, Qwen2, Gemma, Phi-3-style names; GPT-2 and Falcon
# already store them fused). At batch 1 every kernel call streams its weights from memory and pays a fixed
# cost (the call itself, converting the activation row), so one call over the concatenated weights is
# faster than three, with identical results (each output row is the same dot product either way).
FUSABLE_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),  # Mixtral-style experts / some Llama ports
)


class SharedInputProjections(nn.Module):
    """Several projections of one input computed by one packed module (``fused``).

    The block still calls each projection on its own (``SharedInputSlice``): the first call computes all of
    them and keeps the others' outputs, which the next calls collect if they pass the very same, unmodified
    tensor. A call with any other input (or after the input was modified in place; under
    ``torch.inference_mode`` tensors carry no version counter, so there only the tensor's identity is
    checked) computes afresh, so the results do not depend on the call pattern.
    """

    def __init__(self, fused: PackedLinear, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = list(sizes)
        self._pending: tuple | None = None  # (input, its version, outputs not collected yet)

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        # Inference-mode tensors keep no version counter: there the identity of the tensor is what is checked.
        return None if x.is_inference() else x._version

    def output_for(self, index: int, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if (pending is not None and pending[0] is x and pending[1] == self._version(x)
                and pending[2][index] is not None):
            out = pending[2][index]
            pending[2][index] = None
            if all(o is None for o in pending[2]):
                self._pending = None  # release the input and outputs as soon as all are collected
            return out
        parts = [part.contiguous() for part in self.fused(x).split(self.sizes, dim=-1)]
        out, parts[index] = parts[index], None
        self._pending = (x, self._version(x), parts)
        return out


class SharedInputSlice(PackedModuleMixin, nn.Module):
    """One projection of a :class:`SharedInputProjections` group, in its original place in the model.

    The first slice of a group registers the group as its submodule (so ``model.to()`` and byte counts
    see the weights once); the others only refer to it.
    """

    def __init__(self, group: SharedInputProjections, index: int, in_features: int, out_features: int,
                 owner: bool):
        super().__init__()
        self.in_features, self.out_features, self.index = in_features, out_features, index
        if owner:
            self.group = group
        else:
            self.__dict__["_group_ref"] = group  # not a submodule: the owner slice registers it

    @property
    def shared(self) -> SharedInputProjections:
        return self._modules["group"] if "group" in self._modules else self.__dict__["_group_ref"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(self.index, x)

    def logical_num_parameters(self) -> int:
        return 0  # the group's packed module counts the weights of all its slices, once

    def dequantized_weight(self) -> torch.Tensor:
        start = sum(self.shared.sizes[:self.index])
        return self.shared.fused.dequantized_weight()[start:start + self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shares its input's kernel call with {len(self.shared.sizes) - 1} sibling(s)")


def kernel_module(module: nn.Module) -> nn.Module:
    """The module that runs ``module``'s kernel: the shared packed module for a fused projection, else itself."""
    return module.shared.fused if isinstance(module, SharedInputSlice) else module


def fuse_shared_input_projections(model: nn.Module) -> int:
    """Replace each :data:`FUSABLE_SIBLINGS` group of packed linears by one shared kernel call (see
    :class:`SharedInputProjections`). Returns the number of groups fused."""
    fused_groups = 0
    for parent in list(model.modules()):
        for names in FUSABLE_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            # Same packed type (PyTorch's int4pack layout interleaves output rows: its concatenate says None).
            kind = type(members[0])
            if kind not in (Int8PackedLinear, Int4PackedLinear) or not all(type(m) is kind for m in members):
                continue
            if len({(m.in_features, m.compute_dtype) for m in members}) != 1:
                continue
            fused = kind.concatenate(members)
            if fused is None:
                continue
            group = SharedInputProjections(fused, [m.out_features for m in members])
            for index, (name, member) in enumerate(zip(names, members)):
                setattr(parent, name, SharedInputSlice(group, index, member.in_features, member.out_features,
                                                       owner=index == 0))
            fused_groups += 1
    if fused_groups:
        logger.debug("fused %d groups of projections that share their input", fused_groups)
    return fused_groups


# ------------------------------------------------------------------------------------------------------
# Building packed modules from checkpoint tensors
# ------------------------------------------------------------------------------------------------------
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


def build_packed_module(name: str, module: nn.Module, weights, reader: TensorReader, dtype: torch.dtype,
                        device: torch.device) -> nn.Module:
    """The packed replacement for one quantized Linear/Embedding (see the module docstring for the choice)."""
    t = _read_module_tensors(name, module, weights, reader)
    n, k = t["shape"]
    bits = weights.num_bits
    group_size = weights.group_size if weights.strategy == "group" else None
    if isinstance(module, nn.Embedding):
        return PackedEmbedding(t["packed"], bits, t["scale"], t["zero_point"], group_size, dtype, (n, k),
                               padding_idx=module.padding_idx)
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
                    progress: bool = True, fuse_projections: bool = True, quantize_embeddings: bool = False):
    """Load a compressed-tensors ``pack-quantized`` checkpoint (ours or llm-compressor's) for inference
    with weights kept packed.

    Args:
        path_or_repo: a local checkpoint folder or a Hugging Face Hub repo id (downloaded with
            ``huggingface_hub.snapshot_download``; safetensors/json/tokenizer files only).
        device: where to run; "cpu" (default) uses the native int4/int8 kernels, other devices the
            dequantize-on-the-fly fallback.
        dtype: activation and unquantized-weight dtype; by default bfloat16, or float32 on CPUs without native
            bfloat16 arithmetic when our kernels run (see the module docstring).
        fuse_projections: let projections that read the same input (q/k/v, gate/up) share one kernel call
            over their concatenated weights (:func:`fuse_shared_input_projections`); same results, faster
            decode. The modules keep their names and places in the model.
        quantize_embeddings: also quantize a floating-point input embedding table, here at load time, to
            int8 with one scale per row (:class:`Int8RowEmbedding`): ~half the memory of a bfloat16 table,
            and decode reads one row of it per token, so speed is unchanged. Off by default because it
            goes beyond what the checkpoint stores. (A checkpoint whose embeddings are already quantized
            loads them packed either way.)

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
    if dtype is None and torch.device(device or "cpu").type == "cpu":
        dtype = _default_cpu_dtype()
    dtype = _resolve_dtype(dtype)
    device = torch.device(device or "cpu")
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
    if device.type == "cpu":
        _warn_int4_fallbacks(model)
    if fuse_projections:
        fuse_shared_input_projections(model)
    if quantize_embeddings:
        quantize_input_embeddings(model)

    model.to(device).eval().requires_grad_(False)
    _load_generation_config(model, folder)
    return model


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
