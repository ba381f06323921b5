"""``CompressedLinear``: a linear layer whose weight is held as compressed-tensors ``pack-quantized`` buffers.

The module stores exactly the tensors the format stores, under the same names, so the standard
``model.save_pretrained`` writes a compressed-tensors checkpoint with no conversion step:

* ``weight_packed``     int32 (out, ceil(in * bits / 32))  codes packed densely along the input dimension;
* ``weight_scale``      float (out, G)                       one scale per output row and group;
* ``weight_zero_point`` int32 (R, G)                       asymmetric only: zero points packed along rows
  into the first ``ceil(out * bits / 32)`` rows; ``R`` is that number, or ``out`` (zero-padded) where the
  installed compressed-tensors allocates the unpacked shape at load time (see :mod:`.ct_format`);
* ``weight_shape``      int64 (2,)                           the logical ``[out, in]``.

``forward`` dequantizes the whole weight each call (no cache): correct and simple; the fast packed runtime is
:mod:`hfcompress.quantization.runtime`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core.errors import HFCompressError
from . import kernels as K
from . import primitives as P


class CompressedLinear(nn.Module):
    """``y = x W^T + b`` with ``W = (codes - zero_point) * scale`` unpacked from int32 words on the fly."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool = True, bias: bool = False, scale_dtype: torch.dtype = torch.float32,
                 device=None, zero_point_rows: int | None = None):
        super().__init__()
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        G = P.num_groups(in_features, group_size)
        self.register_buffer("weight_packed", torch.zeros(
            out_features, P.packed_length(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, G, dtype=scale_dtype, device=device))
        if not symmetric:
            rows = zero_point_rows or P.packed_length(out_features, bits)
            if rows < P.packed_length(out_features, bits):
                raise ValueError(f"zero_point_rows={rows} cannot hold {out_features} {bits}-bit zero points")
            self.register_buffer("weight_zero_point", torch.zeros(rows, G, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Why this module cannot be written as a loadable compressed-tensors checkpoint (None: it can).
        self.unsupported_reason: str | None = None
        self.register_state_dict_pre_hook(_refuse_unsupported)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                   group_size: int | None, bias: torch.Tensor | None = None,
                   zero_point_rows: int | None = None) -> "CompressedLinear":
        """Build from integer codes (out, in) int8, scales (out, G) and zero points (out, G) or None."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits, group_size, symmetric=zero_point is None,
                     bias=bias is not None, scale_dtype=scale.dtype, device=codes.device,
                     zero_point_rows=zero_point_rows)
        module.weight_packed.copy_(K.pack_weight(codes, bits))
        module.weight_scale.copy_(scale)
        if zero_point is not None:
            packed = K.pack_zero_point(zero_point, bits)
            module.weight_zero_point.zero_()
            module.weight_zero_point[:packed.shape[0]] = packed
        if bias is not None:
            module.bias.data = bias.detach().clone()
        return module

    # ----------------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Signed integer codes (out, in) int8."""
        return K.unpack_weight(self.weight_packed, self.bits, (self.out_features, self.in_features))

    def zero_point(self) -> torch.Tensor | None:
        """Integer zero points (out, G) int32, or None when symmetric."""
        if self.symmetric:
            return None
        return K.unpack_zero_point(self.weight_zero_point, self.bits, self.out_features).to(torch.int32)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) weight in the scale's dtype, computed as compressed-tensors' decompression does."""
        return P.dequantize(self.codes(), self.weight_scale, self.zero_point(), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, "_cached_weight", None)
        if weight is None:
            weight = self.dequantized_weight()
        bias = self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)

    def logical_num_parameters(self) -> int:
        """Weights counted as the dense layer they replace (evaluate.count_parameters calls this)."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{granularity}, symmetric={self.symmetric}, bias={self.bias is not None}")


@contextmanager
def dequantized_weights_cached(root: nn.Module):
    """Within the block, the :class:`CompressedLinear` modules under ``root`` reuse one dequantized weight
    instead of unpacking it at every call (used while running calibration batches through a quantized layer;
    costs one float copy of those weights while it lasts)."""
    modules = [m for m in root.modules() if isinstance(m, CompressedLinear)]
    for module in modules:
        module._cached_weight = module.dequantized_weight()
    try:
        yield
    finally:
        for module in modules:
            module._cached_weight = None


def _refuse_unsupported(module: CompressedLinear, prefix: str, keep_vars: bool) -> None:
    # A state dict is what save_pretrained writes: refuse one that plain transformers would load wrongly.
    if module.unsupported_reason:
        name = prefix.rstrip(".") or type(module).__name__
        raise HFCompressError(f"cannot save {name} as a compressed-tensors checkpoint: {module.unsupported_reason}")
