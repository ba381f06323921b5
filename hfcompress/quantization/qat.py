"""Quantization-aware training: ``prepare_qat(model, config)`` -> train -> ``convert_qat(model)``.

``prepare_qat`` swaps the linears that :func:`~.api.quantize` would quantize (same ``ignore`` patterns, same
group-size fallback, same checks) for :class:`FakeQuantLinear` modules. Their forward uses the weight rounded
to the integer grid and back, ``dequantize(quantize(W))`` — bit for bit what the converted layer computes —
while the backward treats the rounding as the identity: the straight-through estimator (Bengio et al. 2013).
As in ``torch.fake_quantize_per_channel_affine``, a weight whose rounded code falls outside ``[qmin, qmax]``
(it was clamped) gets no gradient: moving it would not change the forward.

Scales: by default min-max scales recomputed from the current weights at every forward (they carry no
gradient), so ``convert_qat`` is exactly round-to-nearest ``quantize`` of the trained weights. With
``learn_scales=True`` each (row, group) scale is a parameter initialised to the min-max scale and trained by
LSQ (Esser et al. 2019, "Learned Step Size Quantization"): its gradient is
``round(w/s) - w/s`` inside the range and ``qmin``/``qmax`` outside (eq. 3), multiplied by
``g = 1 / sqrt(N_W * Q_P)`` (sec. 2.2), ``N_W`` the weights sharing the scale and ``Q_P`` the largest code;
asymmetric zero points stay at their initial value. ``convert_qat`` then quantizes with the learned scales.

``convert_qat`` installs :class:`~.modules.CompressedLinear` modules and the compressed-tensors
``quantization_config`` through the same code as post-training ``quantize``, so the model saves, loads with
``from_pretrained`` and runs in :func:`~.runtime.load_compressed` like any RTN checkpoint.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..core.errors import ConfigError
from . import calibrate as C
from . import ct_format
from . import primitives as P
from .api import (
    LayerReport,
    QuantizationReport,
    Quantized,
    Target,
    _attach_report,
    _check_not_quantized,
    _check_weights,
    _finish,
    _group_sizes,
    _install,
    _replace,
    _rtn_error,
    _rtn_one,
    select_targets,
)
from .config import QuantizationConfig, QuantizationError


# --------------------------------------------------------------------------------------------------------
# The math: straight-through rounding and LSQ's gradient scale, as pure functions
# --------------------------------------------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """``round(x)`` forward (ties to even, as :func:`.primitives.round_values`), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def lsq_grad_scale(weights_per_scale: int, bits: int) -> float:
    """``g = 1 / sqrt(N_W * Q_P)`` (Esser et al. 2019, sec. 2.2): keeps the scale's update in proportion to
    the weights' updates whatever the group size and bit width."""
    return 1.0 / math.sqrt(weights_per_scale * P.quant_range(bits)[1])


def fake_quantize_ste(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                      group_size: int | None, scale_grad: float | None = None) -> torch.Tensor:
    """``dequantize(quantize(weight))`` (out, in) with straight-through gradients.

    The forward repeats :func:`.primitives.quantize` then :func:`.primitives.dequantize` operation for
    operation (codes computed in float32 or wider, dequantized in the scale's dtype), so its value equals
    theirs exactly. Gradients: to ``weight`` 1 where the rounded code lies in ``[qmin, qmax]``, else 0
    (``torch.clamp``'s backward); to ``scale`` (when it requires grad) LSQ's, times ``scale_grad``.
    """
    qmin, qmax = P.quant_range(bits)
    grouped = P._grouped(weight, group_size)  # (out, G, g)
    work = torch.promote_types(weight.dtype, torch.float32)
    if scale_grad is not None:
        scale = _ScaleGrad.apply(scale, scale_grad)
    step = scale.unsqueeze(-1)  # (out, G, 1)
    codes = _RoundSTE.apply(grouped.to(work) / step.to(work))
    if zero_point is not None:
        codes = codes + zero_point.to(work).unsqueeze(-1)
    codes = codes.clamp(qmin, qmax).to(scale.dtype)
    if zero_point is not None:
        codes = codes - zero_point.to(scale.dtype).unsqueeze(-1)
    return (codes * step).reshape(weight.shape)


# --------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------
class FakeQuantLinear(nn.Module):
    """A linear layer trained through its quantized weight: ``y = x Q(W)^T + b`` (see the module docstring).

    ``weight`` (out, in) and ``bias`` are the float parameters being trained; ``scale`` (out, G) is a
    parameter with ``learn_scales``, else ``None`` (min-max scales from the current weight at each call).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None,
                 symmetric: bool = True, learn_scales: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.learn_scales = learn_scales
        self.source_class: type = nn.Linear  # the layer type it replaces (ct_format.unsupported_reason)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.scale = None
        self.register_buffer("zero_point", None)
        if learn_scales:
            scale, zero_point = self.minmax_qparams()
            self.scale = nn.Parameter(scale)
            self.zero_point = zero_point
            g = self.in_features if group_size is None else group_size
            self.scale_grad = lsq_grad_scale(g, bits)

    @classmethod
    def from_linear(cls, module: nn.Module, bits: int, group_size: int | None, symmetric: bool = True,
                    learn_scales: bool = False) -> "FakeQuantLinear":
        """From an ``nn.Linear`` or GPT-2 ``Conv1D`` (its (in, out) weight is stored as (out, in) here)."""
        fake = cls(C.linear_weight(module), getattr(module, "bias", None), bits, group_size, symmetric,
                   learn_scales)
        fake.source_class = type(module)
        return fake

    @torch.no_grad()
    def minmax_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Min-max scales/zero points of the current weight, exactly as round-to-nearest ``quantize`` computes
        them (scale in the weight's dtype)."""
        return P.compute_qparams(self.weight, self.bits, self.group_size, self.symmetric,
                                 scale_dtype=self.weight.dtype)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale is not None:
            return self.scale, self.zero_point
        return self.minmax_qparams()

    def quantized_weight(self) -> torch.Tensor:
        """``dequantize(quantize(W))`` (out, in) with straight-through gradients."""
        scale, zero_point = self.qparams()
        if self.scale is not None:
            # A scale driven to <= 0 by a large step would divide by zero: keep it positive.
            scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)
        return fake_quantize_ste(self.weight, scale, zero_point, self.bits, self.group_size,
                                 self.scale_grad if self.scale is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quantized(self) -> Quantized:
        """Codes/scales/zero points of the current weight (what ``convert_qat`` installs)."""
        scale, zero_point = self.qparams()
        scale = scale.detach().clamp_min(torch.finfo(scale.dtype).tiny)
        codes = P.quantize(self.weight, scale, zero_point, self.bits, self.group_size)
        target = Target("", self, self.group_size)
        return _finish(target, self.weight.detach(), scale.clone(), zero_point, codes)

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{granularity}, symmetric={self.symmetric}, learn_scales={self.learn_scales}")


# --------------------------------------------------------------------------------------------------------
# The verbs
# --------------------------------------------------------------------------------------------------------
def _check_qat_config(config: QuantizationConfig) -> None:
    if config.method != "rtn":
        raise ConfigError(f"prepare_qat trains through round-to-nearest fake quantization; method="
                          f"{config.method!r} is not a QAT method: use QuantizationConfig(method='rtn', ...)")
    if config.observer != "minmax":
        raise ConfigError(f"prepare_qat recomputes min-max scales at every step (or learns them with "
                          f"learn_scales=True); observer={config.observer!r} is not supported: use 'minmax'")
    if config.rounding != "nearest":
        raise ConfigError("prepare_qat uses nearest rounding (the converted model's); use rounding='nearest'")


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def prepare_qat(model: nn.Module, config: QuantizationConfig | dict | None = None,
                learn_scales: bool = False) -> nn.Module:
    """Swap the linears ``quantize(model, config)`` would quantize for :class:`FakeQuantLinear` (in place).

    ``config``: a round-to-nearest :class:`QuantizationConfig` (bits, group_size, symmetric, ignore); default
    int4, group size 128, ``lm_head`` kept. ``learn_scales``: LSQ-trained scales. Returns ``model``, ready for
    ``Trainer``/``DistillationTrainer``; call :func:`convert_qat` after training.
    """
    if config is None:
        config = QuantizationConfig()
    if isinstance(config, dict):
        config = QuantizationConfig.from_dict(config)
    if not isinstance(config, QuantizationConfig):
        raise ConfigError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    _check_qat_config(config)
    _check_not_quantized(model)
    if fake_quant_layers(model):
        raise QuantizationError(f"{type(model).__name__} is already prepared for QAT (it has FakeQuantLinear "
                                f"layers); train it and call convert_qat, or prepare the original model")
    targets = select_targets(model, config.ignore)
    _check_weights(model, targets)
    group_sizes = _group_sizes(targets, config.group_size)
    for name, module in targets.items():
        _replace(model, name, FakeQuantLinear.from_linear(module, config.bits, group_sizes[name],
                                                          config.symmetric, learn_scales))
    model.hfcompress_qat = {"quantization": config.to_dict(), "learn_scales": learn_scales}
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` by the :class:`CompressedLinear` of its trained weight (in place).

    The model ends exactly as post-training ``quantize`` leaves it (``quantization_config``, report), so
    ``save_pretrained`` writes a compressed-tensors checkpoint. Without learned scales the result equals
    ``quantize(model, QuantizationConfig(method='rtn', ...))`` of the trained float weights.
    """
    started = time.perf_counter()
    layers = fake_quant_layers(model)
    if not layers:
        raise QuantizationError(f"{type(model).__name__} has no FakeQuantLinear layers to convert; call "
                                f"prepare_qat(model, config) before training")
    settings = getattr(model, "hfcompress_qat", None) or {}
    config = QuantizationConfig.from_dict(settings.get("quantization", {}))
    report = QuantizationReport(method="rtn", config=config.to_dict())
    for name, module in layers.items():
        target = Target(name, module, module.group_size)
        before = _rtn_error(target.weight, module.group_size, None, config)
        if module.scale is None:
            result = _rtn_one(target, config, None)
        else:
            result = module.to_quantized()
        _install(model, target, result, config)
        report.layers.append(LayerReport(
            name=name, bits=module.bits, group_size=module.group_size,
            fallback=module.group_size != config.group_size, error_before=before, error_after=result.error,
            metric="weight", extra={"qat": True, "learned_scales": module.scale is not None}))
    report.seconds = time.perf_counter() - started
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = ct_format.quantization_config(model)
    _attach_report(model, report)
    if getattr(model, "config", None) is not None:
        model.config.hfcompress["qat"] = {"learned_scales": bool(settings.get("learn_scales"))}
    if hasattr(model, "hfcompress_qat"):
        del model.hfcompress_qat
    return model
