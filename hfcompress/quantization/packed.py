"""The packed modules of the CPU runtime: Linears and Embeddings that keep their weights quantized in memory
and multiply with our native kernels (or PyTorch's), and the sharing of one kernel call between projections that
read the same input. :mod:`.runtime` builds them from a checkpoint (:func:`.runtime.load_compressed`);
:mod:`.cuda_runtime` derives its GPU modules from them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import HFCompressError
from . import kernels
from ..core.native import (
    int4_gemv_available,
    int4_gemv_op,
    int8_gemv_available,
    int8_gemv_op,
    kernel_isa,
)


logger = logging.getLogger(__name__)


SAVE_PACKED_HINT = ("a model from load_compressed() is saved by copying its checkpoint folder; to save a model "
                    "quantized at load, load it with HFCompressConfig(packed=False), or quantize with "
                    "hfcompress.quantize(...) + save_pretrained / `hfcompress quantize MODEL OUT`")


def packed_modules(model: nn.Module) -> list[str]:
    """Names of the packed runtime modules in ``model`` (their kernel layouts cannot be saved)."""
    return [name for name, module in model.named_modules() if isinstance(module, PackedModuleMixin)]


class PackedModuleMixin:
    """Shared behaviour: logical parameter count, and refusing to be saved as if it were a float model."""

    def logical_num_parameters(self) -> int:
        bias = getattr(self, "bias", None)
        return self.out_features * self.in_features + (bias.numel() if bias is not None else 0)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Our kernel layouts are not the compressed-tensors layout: saving them would write a checkpoint
        # that plain from_pretrained loads as random float weights. Refuse instead.
        raise HFCompressError(f"module {prefix.rstrip('.')!r} is a packed runtime module and is inference-only; "
                              f"{SAVE_PACKED_HINT}")


def cat_rows(members: list, name: str) -> torch.Tensor | None:
    """The members' ``name`` tensors stacked along the output rows (dim 0), or None where they hold none."""
    first = getattr(members[0], name)
    return None if first is None else torch.cat([getattr(m, name) for m in members])


class PackedLinear(PackedModuleMixin, nn.Module):
    """A Linear whose weight stays quantized; subclasses implement ``_matmul`` and ``dequantized_weight``."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def fused_shell(cls, members: list["PackedLinear"]) -> "PackedLinear":
        """An empty ``cls`` as wide as ``members`` side by side, with their biases concatenated: what a
        ``concatenate`` fills with the members' stacked weight buffers."""
        first = members[0]
        fused = cls.__new__(cls)
        PackedLinear.__init__(fused, first.in_features, sum(m.out_features for m in members),
                              cat_rows(members, "bias"), first.compute_dtype)
        return fused

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
        fused = cls.fused_shell(members)
        fused.group_size, fused.backend = first.group_size, "hfcompress"
        fused.kernel_group_size = first.kernel_group_size
        for name in ("weight_int4", "weight_scale", "weight_offset"):
            fused.register_buffer(name, cat_rows(members, name))
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
        fused = cls.fused_shell(members)
        for name in ("weight_int8", "weight_scale", "zero_scale"):
            fused.register_buffer(name, cat_rows(members, name))
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


class FlatInputLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies its input as a contiguous 2-D matrix: for the floating-point LM head.

    The head's input in a prefill is the last position sliced out of (1, T, H): a (1, 1, H) view with strides
    (T*H, H, 1). On the CPU, in bfloat16, ``F.linear`` sends that through a batched matmul that first copies the
    whole transposed weight (SmolLM2-135M: 66 ms of a 209 ms 64-token prompt, against 3 ms as a (1, H) matrix).
    Same parameters, same numbers; only the call shape differs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (rows, out)
        return y.view(*x.shape[:-1], self.out_features)


def flatten_head_input(model: nn.Module) -> bool:
    """Make a plain floating-point output head a :class:`FlatInputLinear` (in place; weights and tying kept).
    Returns whether it did."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return False
    head.__class__ = FlatInputLinear
    return True


def quantize_input_embeddings(model: nn.Module, tied_head: bool = True) -> bool:
    """Replace the model's float input embedding table by an :class:`Int8RowEmbedding`.

    A table tied to the output head (``tie_word_embeddings``, e.g. SmolLM2, Llama-3.2-1B) is quantized once for
    both: the head becomes an :class:`Int8PackedLinear` over the same int8 codes and per-row scales (no second
    copy), so logits come from the int8 table, as llama.cpp's GGUF files store such a shared table (Q8_0). At
    decode that head is the largest matrix of a small model (49152 x 576 for SmolLM2-135M, as many weights as
    a third of its decoder layers): int8 halves its bytes against bfloat16 and runs on our int8 kernel (CPU;
    ``tied_head=False`` keeps such a table in floating point). Skipped, with a warning, when the table is shared
    with anything else."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return False
    weight = embedding.weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head if tied_head and isinstance(head, nn.Linear) and head.weight is weight and head.bias is None else None
    shared_with = [name for name, module in model.named_modules()
                   if module is not embedding and module is not tied
                   and getattr(module, "weight", None) is weight]
    if shared_with:
        logger.warning("quantize_embeddings: the input embedding table is also used by %s; keeping it in floating "
                       "point", ", ".join(shared_with))
        return False
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    table = Int8RowEmbedding(weight, dtype, embedding.padding_idx)
    model.set_input_embeddings(table)
    if tied is not None:
        model.set_output_embeddings(Int8PackedLinear(table.weight_int8, table.weight_scale, None, None, dtype))
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
        # Under torch.compile the traced program is checked instead: Dynamo follows tensor identity exactly
        # and sees every in-place op, which it cannot express as a version number.
        if torch.compiler.is_compiling() or x.is_inference():
            return None
        return x._version

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
            kind = type(members[0])
            # Packed kinds that can concatenate (int8, our int4, CUDA's tinygemm int4; PyTorch's int4pack layout
            # interleaves output rows, so its concatenate says None), all members of one kind.
            if not isinstance(members[0], PackedLinear) or not hasattr(kind, "concatenate") or \
                    not all(type(m) is kind for m in members):
                continue
            if len({(type(m), m.in_features, m.compute_dtype) for m in members}) != 1:
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
