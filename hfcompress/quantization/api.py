"""``quantize(model, QuantizationConfig(...))``: post-training quantization of a Transformers model in place.

* ``cast``: a plain dtype cast to float16/bfloat16.
* ``rtn``: round-to-nearest (or stochastic) per group/channel, min-max or MSE-searched clipping; with
  calibration data the MSE search weights the error by the layer's input statistics.
* ``gptq`` / ``awq``: calibrated layer by layer (see :mod:`.calibrate`, :mod:`.gptq`, :mod:`.awq`); GPTQ by
  default in one forward pass per layer, in GPTQ's true-sequential order (:mod:`.sequential`).
* ``bnb_*``: bitsandbytes through transformers' own quantizer, in memory
  (:func:`hfcompress.quantization.bnb.quantize_bnb`).

Every method modifies ``model`` in place and returns that same object, so ``quantize(model, ...)`` followed by
``model.save_pretrained(dir)`` saves the quantized model.

Integer methods replace each targeted ``nn.Linear`` (or GPT-2 ``Conv1D``) by a
:class:`~.modules.CompressedLinear` and set ``model.config.quantization_config`` to the compressed-tensors
description, so ``model.save_pretrained(dir)`` writes a checkpoint that plain ``from_pretrained`` loads.
The per-layer :class:`QuantizationReport` is returned on ``model.hfcompress_report`` and saved in
``config.json`` under ``hfcompress``.

Group sizes that do not divide a layer's width: the layer uses the largest power of two below
``group_size`` that divides it, else one scale per output channel (see
:func:`.primitives.fallback_group_size`); a warning names those layers and the report records them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, DataError
from . import awq as A
from . import calibrate as C
from . import coverage as CV
from . import ct_format
from . import primitives as P
from . import sequential as S
from .config import QuantizationConfig, QuantizationError
from .gptq import gptq_quantize
from .modules import CompressedLinear, dequantized_weights_cached
from .rollback import Rollback, choose_keep

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One quantized layer. Errors are relative: ``sqrt(E||(W - W_q) x||^2 / E||W x||^2)`` over the
    calibration inputs (``metric="output"``), or ``||W - W_q|| / ||W||`` without them (``metric="weight"``).
    ``error_before`` is plain min-max round-to-nearest at the same bits/group size; ``error_after`` is the
    method's result."""

    name: str
    bits: int
    group_size: int | None
    fallback: bool
    error_before: float
    error_after: float
    metric: str
    extra: dict = field(default_factory=dict)


@dataclass
class QuantizationReport:
    method: str
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    calibration_samples: int = 0
    seconds: float = 0.0
    true_sequential: bool = False  # GPTQ ran in one pass per layer (see QuantizationConfig.true_sequential)
    coverage: dict | None = None  # coverage.Coverage.to_dict(): what was quantized, what was not and why

    @property
    def coverage_line(self) -> str | None:
        """E.g. "14 of 15 linear weights quantized, 61.8% of parameters"."""
        return None if self.coverage is None else self.coverage["line"]

    @property
    def fallbacks(self) -> dict[str, int | None]:
        """Layers that use another group size than asked -> the group size used (None = per-channel)."""
        return {layer.name: layer.group_size for layer in self.layers if layer.fallback}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fallbacks"] = self.fallbacks
        return data

    def table(self) -> str:
        """Markdown table, one row per layer."""
        lines = ["| layer | bits | group | error before (RTN) | error after |", "|---|---|---|---|---|"]
        for layer in self.layers:
            group = "channel" if layer.group_size is None else str(layer.group_size)
            if layer.fallback:
                group += " (fallback)"
            lines.append(f"| {layer.name} | {layer.bits} | {group} | {layer.error_before:.4f} | "
                         f"{layer.error_after:.4f} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Checks (all run before the model is modified)
# --------------------------------------------------------------------------------------------------------
def _check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "hf_quantizer", None) is not None or \
            getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise QuantizationError(f"{type(model).__name__} is already quantized (its config has a "
                                f"quantization_config); quantize the original floating-point model instead")
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) or type(module).__module__.startswith("bitsandbytes"):
            raise QuantizationError(f"{type(model).__name__} is already quantized ({name} is a "
                                    f"{type(module).__name__}); quantize the original floating-point model")


def select_targets(model: nn.Module, ignore: list[str]) -> dict[str, nn.Module]:
    """Linear layers (nn.Linear / Conv1D) to quantize, by name, in module order."""
    targets = {name: module for name, module in model.named_modules()
               if name and C.is_linear(module) and not any(C.matches(name, p) for p in ignore)}
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layers left to quantize after "
                          f"ignore={ignore}; check the ignore patterns")
    return targets


def _check_weights(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    owners: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(param.data_ptr(), name)
    for name, module in targets.items():
        weight = module.weight
        owner = owners.get(weight.data_ptr())
        if owner is not None and owner != f"{name}.weight":
            raise QuantizationError(f"{name}.weight is shared with {owner} (tied weights); add {name!r} to "
                                    f"QuantizationConfig.ignore to keep it in floating point")
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise QuantizationError(f"{name}.weight has {bad} NaN/Inf values; fix or re-load the model "
                                    f"before quantizing")


_NAN_FIX = ("the float model overflows or is corrupt on this data: check its non-linear weights (norms, "
            "biases), run it in float32/bfloat16 rather than float16 (calibration_dtype=None), or check the "
            "calibration data")


def _check_finite_stats(layer_name: str, targets: dict) -> None:
    """Calibration activations with NaN/Inf would give NaN scales silently: stop, naming the linear. The input
    second moment E[x x^T] is non-finite exactly when some input is (a cheap check of every token)."""
    for name, target in targets.items():
        stats = target.stats
        if stats is not None and not torch.isfinite(stats.hessian).all():
            raise QuantizationError(f"the calibration activations entering {name} (decoder layer {layer_name}) "
                                    f"hold NaN/Inf values; {_NAN_FIX}")


def _check_finite_activations(inputs: C.LayerInputs, where: str) -> None:
    for i in range(len(inputs)):
        hidden = C.hidden_states(inputs, i)
        if not torch.isfinite(hidden).all():
            bad = int((~torch.isfinite(hidden)).sum())
            raise QuantizationError(f"{where} hold {bad} NaN/Inf values on calibration batch {i}; {_NAN_FIX}")


def _group_sizes(targets: dict[str, nn.Module], group_size: int | None) -> dict[str, int | None]:
    """Effective group size per layer; errors if ``group_size`` divides no layer's width."""
    widths = {name: C.linear_shape(module)[1] for name, module in targets.items()}
    if group_size is None:
        return dict.fromkeys(widths)
    if not any(width % group_size == 0 for width in widths.values()):
        distinct = sorted(set(widths.values()))
        powers = [1 << k for k in range(group_size.bit_length() - 1, 0, -1)]
        suggest = next((p for p in powers if all(w % p == 0 for w in distinct)), None) or \
            next((p for p in powers if any(w % p == 0 for w in distinct)), None)
        raise ConfigError(f"group_size={group_size} divides none of the {len(widths)} layers to quantize "
                          f"(input widths {distinct}); use group_size={suggest} or None (per-channel)")
    sizes = {name: P.fallback_group_size(width, group_size) for name, width in widths.items()}
    fallen = {name: size for name, size in sizes.items() if size != group_size}
    if fallen:
        warnings.warn(f"group_size={group_size} does not divide the width of {len(fallen)} layer(s); they "
                      f"use a smaller group: {_fallback_summary(fallen, widths)}", UserWarning, stacklevel=3)
    return sizes


def _fallback_summary(fallen: dict[str, int | None], widths: dict[str, int]) -> str:
    """'width 576 -> 64: model.layers.*.mlp.up_proj, ... (180 layers)': one entry per (width, group), layer
    indices folded into '*' so a deep model's warning stays a line (the exact per-layer group sizes are in the
    saved config)."""
    by_rule: dict[tuple[int, int | None], list[str]] = {}
    for name, size in fallen.items():
        by_rule.setdefault((widths[name], size), []).append(name)
    parts = []
    for (width, size), names in by_rule.items():
        patterns = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in names))
        shown = ", ".join(patterns[:8]) + (f", ... ({len(patterns) - 8} more)" if len(patterns) > 8 else "")
        parts.append(f"width {width} -> {'per-channel' if size is None else size}: {shown} ({len(names)} layers)")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------
# Methods: each turns (weight, statistics) into codes/scales/zero points
# --------------------------------------------------------------------------------------------------------
@dataclass
class Quantized:
    codes: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out, G)
    zero_point: torch.Tensor | None  # (out, G) int32
    error: float  # relative error (see LayerReport)
    extra: dict = field(default_factory=dict)


@dataclass
class Target:
    """A layer to quantize: its module, (out, in) float weight, effective group size and input statistics."""

    name: str
    module: nn.Module
    group_size: int | None
    stats: C.InputStats | None = None

    @property
    def weight(self) -> torch.Tensor:
        return C.linear_weight(self.module).detach()

    @property
    def hessian(self) -> torch.Tensor | None:
        return None if self.stats is None else self.stats.hessian


def _rtn_error(weight: torch.Tensor, group_size, hessian, config: QuantizationConfig) -> float:
    approx = P.fake_quantize(weight.float(), config.bits, group_size, config.symmetric)
    return P.relative_output_error(weight, approx, hessian)


def _finish(target: Target, weight: torch.Tensor, scale, zero_point, codes, extra=None) -> Quantized:
    approx = P.dequantize(codes, scale, zero_point, target.group_size, dtype=torch.float32)
    error = P.relative_output_error(weight, approx, target.hessian)
    return Quantized(codes, scale, zero_point, error, extra or {})


def rtn_weight(weight: torch.Tensor, group_size: int | None, config: QuantizationConfig, generator=None,
               hessian: torch.Tensor | None = None) -> Quantized:
    """Method ``rtn`` on one (out, in) weight: scales (min-max, or the MSE-searched clip, weighted by ``hessian``
    when given), then codes. Also what :mod:`.hf_quantizer` runs on each weight as ``from_pretrained`` loads it."""
    clip = 1.0
    if config.observer == "mse":
        clip = P.search_clip(weight, config.bits, group_size, config.symmetric, hessian=hessian)
    scale, zero_point = P.compute_qparams(weight, config.bits, group_size, config.symmetric, clip=clip,
                                          stochastic=config.rounding == "stochastic", scale_dtype=weight.dtype)
    codes = P.quantize(weight, scale, zero_point, config.bits, group_size, config.rounding, generator)
    approx = P.dequantize(codes, scale, zero_point, group_size, dtype=torch.float32)
    return Quantized(codes, scale, zero_point, P.relative_output_error(weight, approx, hessian))


def _rtn_one(target: Target, config: QuantizationConfig, generator) -> Quantized:
    return rtn_weight(target.weight, target.group_size, config, generator, target.hessian)


def rtn_without_data(name: str, weight: torch.Tensor, group_size: int | None, config: QuantizationConfig,
                     generator=None) -> tuple[Quantized, LayerReport]:
    """RTN of a layer no calibration statistics reach, with its report row (errors relative to the weight)."""
    before = _rtn_error(weight, group_size, None, config)
    result = rtn_weight(weight, group_size, config, generator)
    return result, LayerReport(name=name, bits=config.bits, group_size=group_size,
                               fallback=group_size != config.group_size, error_before=before,
                               error_after=result.error, metric="weight")


def quantize_rtn(layer, layer_name, targets: dict[str, Target], config, generator, probe=None) -> dict[str, Quantized]:
    return {name: _rtn_one(t, config, generator) for name, t in targets.items()}


def quantize_gptq(layer, layer_name, targets: dict[str, Target], config, generator, probe=None) -> dict[str, Quantized]:
    """GPTQ each linear against its input Hessian.

    Linears that share one input (hence one Hessian: q/k/v, gate/up) and one group size are quantized as a
    single matrix stacked along the output dimension: GPTQ treats every output row independently given the
    Hessian (scales, clipping and error feedback are all per row), so this gives the same codes with one
    column sweep instead of several. Stochastic rounding keeps one sweep per linear, so that its random
    stream does not depend on which linears happen to be stacked.
    """
    buckets: dict[tuple, list[Target]] = {}
    for t in targets.values():
        shared = config.rounding == "nearest" and t.stats is not None
        key = (id(t.stats), t.group_size, t.weight.dtype) if shared else (t.name,)
        buckets.setdefault(key, []).append(t)
    results = {}
    for group in buckets.values():
        weights = [t.weight for t in group]
        codes, scale, zero_point = gptq_quantize(
            torch.cat(weights) if len(weights) > 1 else weights[0], group[0].hessian, config.bits,
            group[0].group_size, symmetric=config.symmetric, damp=config.damp, block_size=config.block_size,
            act_order=config.act_order, static_groups=config.static_groups, observer=config.observer,
            rounding=config.rounding, generator=generator)
        start = 0
        for t, weight in zip(group, weights):
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            results[t.name] = _finish(t, weight, scale[rows], None if zero_point is None else zero_point[rows],
                                      codes[rows])
    return results


def quantize_awq(layer, layer_name, targets: dict[str, Target], config, generator, probe=None) -> dict[str, Quantized]:
    """AWQ on one decoder layer: fold the searched input scales, then clip-search and quantize each linear.

    Each mapping's scale search (:func:`.awq.search_scale`) measures, for linears sharing one input (q/k/v,
    gate/up), the error at the output of their common parent block, re-run on the first
    :data:`.awq.AWQ_SEARCH_TOKENS` calibration tokens (:func:`.awq.block_error`); for a single linear,
    or without ``probe.inputs``, its own output error from the input Hessian (all calibration tokens).

    ``probe()`` runs the (still floating-point) layer on one calibration batch; ``probe.inputs``, when
    present (:class:`.calibrate.LayerProbe`), holds all of the layer's calibration inputs. A fold must leave
    the layer's function unchanged; one that does not (the scaled output also feeds something else, e.g. the
    residual branch of a post-norm block such as BERT's) is undone and that mapping skipped.
    """
    relative = {t.name[len(layer_name) + 1:]: t for t in targets.values()}
    modules = dict(layer.named_modules())
    extras: dict[str, dict] = {}
    reference = probe() if probe is not None else None
    inputs = getattr(probe, "inputs", None)
    autocast = getattr(probe, "autocast", contextlib.nullcontext)  # config.calibration_dtype
    for prev, linears in A.layer_mappings(layer, set(relative)):
        group = [relative[n] for n in linears]
        if len({t.group_size for t in group}) != 1:
            continue
        stats = group[0].stats
        error, objective = None, "layer"
        parent_name = A.common_parent(linears)
        if inputs is not None and parent_name not in linears:
            parent = modules[parent_name]  # "" is the layer itself
            with autocast():
                calls = C.capture_module_calls(layer, parent, inputs, A.AWQ_SEARCH_TOKENS)
            if calls:
                error = A.block_error(parent, [t.module for t in group], calls, autocast)
                objective = "block"
        scale, alpha = A.search_scale([t.weight for t in group], stats.hessian, stats.abs_mean, config.bits,
                                      group[0].group_size, config.symmetric, error=error)
        error = calls = None  # free the cached block inputs
        if alpha == 0:
            continue
        A.scale_inputs([t.module for t in group], scale)  # W' = W diag(s)
        A.fold_into(modules, prev, scale)
        if reference is not None:
            folded = probe()
            tolerance = max(1e-3, 4 * torch.finfo(reference.dtype).eps)  # rounding of the rescaled weights
            if (folded - reference).float().norm() > tolerance * reference.float().norm():
                A.scale_inputs([t.module for t in group], 1.0 / scale)
                A.fold_into(modules, prev, 1.0 / scale)
                logger.info("AWQ: %s.%s feeds more than %s; not folding a scale into it", layer_name, prev,
                            ", ".join(linears))
                continue
        # The linears now see x / s: transform their statistics (once per distinct statistics object).
        for s in {id(t.stats): t.stats for t in group}.values():
            s.hessian = s.hessian / (scale.unsqueeze(0) * scale.unsqueeze(1))
            s.abs_mean = s.abs_mean / scale
        for t in group:
            extras[t.name] = {"awq_alpha": alpha, "awq_folded_into": prev, "awq_objective": objective}
    results = {}
    for name, t in targets.items():
        weight = t.weight
        clip = P.search_clip(weight, config.bits, t.group_size, config.symmetric, hessian=t.hessian) \
            if A.AWQ_CLIP else 1.0
        scale, zero_point = P.compute_qparams(weight, config.bits, t.group_size, config.symmetric, clip=clip,
                                              stochastic=config.rounding == "stochastic", scale_dtype=weight.dtype)
        codes = P.quantize(weight, scale, zero_point, config.bits, t.group_size, config.rounding, generator)
        results[name] = _finish(t, weight, scale, zero_point, codes, extras.get(name))
    return results


METHODS = {"rtn": quantize_rtn, "gptq": quantize_gptq, "awq": quantize_awq}


# --------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compressed_linear(source: nn.Module, result: Quantized, bits: int, group_size: int | None) -> CompressedLinear:
    """The :class:`CompressedLinear` holding ``result`` in place of ``source`` (whose bias it copies)."""
    bias = getattr(source, "bias", None)
    module = CompressedLinear.from_codes(
        result.codes, result.scale, result.zero_point, bits, group_size,
        bias=None if bias is None else bias.detach(),
        zero_point_rows=ct_format.zero_point_rows(result.codes.shape[0], bits))
    module.unsupported_reason = ct_format.unsupported_reason(module, source)
    return module


def _install(model, target: Target, result: Quantized, config: QuantizationConfig,
             rollback: Rollback | None = None) -> CompressedLinear:
    source = target.module
    module = compressed_linear(source, result, config.bits, target.group_size)
    _replace(model, target.name, module)
    if rollback is not None:
        rollback.replaced(target.name, source)
    return module


def _cast(model: nn.Module, config: QuantizationConfig, started: float, strict: bool) -> nn.Module:
    """A dtype cast: every floating-point parameter and buffer (no rollback: ``Module.to`` converts tensor
    by tensor and fails only before it starts, on a bad dtype)."""
    dtype = getattr(torch, config.dtype)
    planned = CV.plan(model, [])
    model.to(dtype)
    report = QuantizationReport(method="cast", config=config.to_dict(), seconds=time.perf_counter() - started)
    coverage = CV.audit(model, planned, lambda m: m.weight.dtype == dtype, verb=f"cast to {config.dtype}")
    # A cast converts every floating-point tensor, embeddings included.
    coverage.skipped = {n: r for n, r in coverage.skipped.items() if r != CV.EMBEDDING}
    coverage.quantized_parameters = sum(p.numel() for p in model.parameters() if p.dtype == dtype)
    report.coverage = coverage.to_dict()
    if strict and coverage.left_float:
        raise QuantizationError(f"strict=True: {', '.join(coverage.left_float)} are not {config.dtype} after the "
                                f"cast")
    _attach_report(model, report)
    return model


def _audit(model: nn.Module, planned: CV.Plan, report: QuantizationReport, is_quantized, strict: bool,
           verb: str = "quantized") -> CV.Coverage:
    """Record what was quantized (:mod:`.coverage`) in ``report``; with ``strict``, raise if a weight meant to
    be quantized is still floating point."""
    coverage = CV.audit(model, planned, is_quantized, verb=verb)
    report.coverage = coverage.to_dict()
    missing = CV.not_covered(planned, coverage)
    if coverage.left_float:
        logger.warning("%d linear layer(s) meant to be quantized are still floating point: %s",
                       len(coverage.left_float), ", ".join(coverage.left_float))
    if strict and missing:
        detail = ", ".join(f"{name} ({coverage.skipped[name]})" for name in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise QuantizationError(f"strict=True: {len(missing)} weight(s) meant to be quantized are still floating "
                                f"point: {detail}{more}; add them to QuantizationConfig.ignore to keep them in "
                                f"float on purpose, or pass strict=False")
    return coverage


def _forget_quantization(model: nn.Module) -> None:
    """Remove what a failed :func:`quantize` may have set on the model (the rollback puts the layers back)."""
    config = getattr(model, "config", None)
    for attribute in ("quantization_config", "hfcompress"):
        if config is not None and attribute in vars(config):
            delattr(config, attribute)
    model.__dict__.pop("hfcompress_report", None)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _attach_report(model: nn.Module, report: QuantizationReport) -> None:
    model.hfcompress_report = report
    if getattr(model, "config", None) is not None:
        # Saved in config.json by save_pretrained (transformers serializes extra config attributes).
        model.config.hfcompress = {"quantization": report.config,
                                   "fallback_group_sizes": report.fallbacks,
                                   "layers": [asdict(layer) for layer in report.layers],
                                   "calibration_samples": report.calibration_samples,
                                   "true_sequential": report.true_sequential,
                                   "coverage": None if report.coverage is None else CV.stored(report.coverage)}


def quantize(model: nn.Module, config: QuantizationConfig | dict, calibration_data=None, tokenizer=None,
             progress: bool = True, strict: bool = False) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says and return that same object (see the module docstring).

    ``calibration_data``: a list of strings, a ``datasets.Dataset``, a text source string (``"stdlib"``, a
    path, a dataset name) or a pre-tokenized LongTensor (N, T); required by ``gptq``/``awq``, optional for
    ``rtn`` (it then weights the MSE clipping search and measures output errors; with the min-max observer
    data that cannot be used is ignored with a warning). Text needs ``tokenizer``. Less data than
    ``num_samples`` x ``seq_len`` tokens is used whole, with a warning; see
    :func:`.calibrate.calibration_blocks` (fewer than 128 tokens in all is refused).
    Every check (config, weights, data, architecture) runs before the model is modified.

    Afterwards ``model.hfcompress_report.coverage`` says which linear weights were quantized and why any other
    was not (:mod:`.coverage`); ``strict=True`` raises :class:`QuantizationError`, naming them, if a weight
    meant to be quantized is still floating point (everything not in ``ignore``, including weights of module
    types no method here quantizes, such as fused 3-D MoE experts). If quantization fails half-way (or
    ``strict`` refuses), the original weights are put back (:mod:`.rollback`), or, when holding them would
    not fit in memory, the model is marked so that saving it raises.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(...)), got "
                          f"{type(model).__name__}")
    if isinstance(config, dict):
        config = QuantizationConfig.from_dict(config)
    if not isinstance(config, QuantizationConfig):
        raise ConfigError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    _check_not_quantized(model)
    if config.method == "cast":
        return _cast(model, config, started, strict)
    planned = CV.plan(model, config.ignore)
    if config.method.startswith("bnb_"):
        from .bnb import bnb_bytes, is_bnb_linear, quantize_bnb  # lazy: bitsandbytes is heavy to import

        _check_weights(model, {name: model.get_submodule(name) for name in planned.targets})

        with Rollback(model, keep=choose_keep(model, bnb_bytes(model, config))) as rollback:
            rollback.on_undo(lambda: _forget_quantization(model))
            quantize_bnb(model, config, rollback)
            report = QuantizationReport(method=config.method, config=config.to_dict(),
                                        seconds=time.perf_counter() - started)
            _audit(model, planned, report, is_bnb_linear, strict)
            _attach_report(model, report)
        rollback.commit()
        return model

    targets = select_targets(model, config.ignore)
    _check_weights(model, targets)
    if config.needs_calibration and calibration_data is None:
        raise DataError(f"method={config.method!r} needs calibration data: pass calibration_data= (texts, a "
                        f"dataset, 'stdlib' or token ids) and tokenizer=")
    blocks = None
    layers: list[tuple[str, nn.Module]] = []
    if calibration_data is not None:
        try:
            blocks = C.calibration_blocks(calibration_data, tokenizer, config.num_samples, config.seq_len,
                                          seed=config.seed, model_config=getattr(model, "config", None))
            layers = C.find_sequential_layers(model, config.sequential_targets, set(targets))
        except (DataError, ConfigError) as exc:
            if config.method != "rtn" or config.observer != "minmax":
                raise
            # Min-max RTN's codes do not depend on data (it would only measure output errors for the report).
            warnings.warn(f"not using the calibration data, which rtn with observer='minmax' does not need: {exc}",
                          UserWarning, stacklevel=2)
            blocks, layers = None, []
    group_sizes = _group_sizes(targets, config.group_size)

    # ---- from here on the model is modified ----
    report = QuantizationReport(method=config.method, config=config.to_dict(),
                                calibration_samples=0 if blocks is None else blocks.shape[0])
    quantized_bytes = sum(C.linear_weight(m).numel() for m in targets.values()) * config.bits // 8
    rollback = Rollback(model, keep=choose_keep(model, quantized_bytes))
    rollback.on_undo(lambda: _forget_quantization(model))
    steps = LayerwiseQuantizer(model, config, targets, group_sizes, report, rollback)
    with _eval_mode(model), rollback:
        if blocks is not None:
            autocast = lambda: C.calibration_autocast(model, config.calibration_dtype)  # noqa: E731
            with autocast():
                inputs = C.capture_first_layer_inputs(model, layers[0][1], blocks)
                C.capture_layer_kwargs(model, [layer for _, layer in layers], blocks, inputs)
            first_kwargs = list(inputs.kwargs)  # the first layer's; later layers may differ (Gemma 3)
            _check_finite_activations(inputs, f"the inputs of the first decoder layer {layers[0][0]} (the "
                                              f"embeddings of the calibration tokens)")
            one_pass = config.method == "gptq" and config.true_sequential and S.fits_in_memory(inputs, targets)
            report.true_sequential = one_pass
            bar = tqdm(layers, desc=f"{config.method} {config.bits}-bit", disable=not progress, unit="layer")
            last = layers[-1][0]
            for index, (layer_name, layer) in enumerate(bar):
                bar.set_postfix_str(layer_name)
                C.use_layer_kwargs(inputs, index, first_kwargs)
                steps.quantize_layer(layer_name, layer, inputs, autocast, one_pass, propagate=layer_name != last)
            del inputs
        rest = steps.remaining()
        if rest and blocks is not None:
            logger.info("quantizing %d layer(s) without calibration statistics (outside the decoder layers, "
                        "or never called) with RTN: %s", len(rest), ", ".join(rest))
        steps.quantize_uncalibrated(rest, progress=progress and blocks is None)
        report.seconds = time.perf_counter() - started
        finish_report(model, config, planned, report, strict)
    rollback.commit()
    return model


def finish_report(model: nn.Module, config: QuantizationConfig, planned: CV.Plan, report: QuantizationReport,
                  strict: bool) -> None:
    """Once every target is quantized: order the per-layer report as the targets, audit the coverage, set
    ``config.quantization_config`` (compressed-tensors) and the ``hfcompress`` block of ``config.json``."""
    order = {name: i for i, name in enumerate(planned.targets)}
    report.layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    _audit(model, planned, report, lambda m: isinstance(m, CompressedLinear), strict)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = ct_format.quantization_config(
            model, actorder=config.method == "gptq" and config.act_order)
    _attach_report(model, report)


class LayerwiseQuantizer:
    """The per-layer steps of an integer quantization (``rtn``/``gptq``/``awq``), shared by :func:`quantize`
    (the whole model in memory) and :func:`hfcompress.quantization.streaming.quantize_checkpoint` (one decoder
    layer materialised at a time): quantize the targets of one decoder layer from its calibration inputs and
    replace them by :class:`CompressedLinear` modules, run the quantized layer to produce the next layer's
    inputs, and round the targets outside the decoder layers to nearest.

    ``targets``: name -> linear still to quantize (set to None once replaced); ``report`` collects one
    :class:`LayerReport` per linear; ``rollback`` records every change (``Rollback(keep=False)`` records
    nothing). ``generator`` (seeded from ``config.seed``) is the random stream of stochastic rounding.
    """

    def __init__(self, model: nn.Module, config: QuantizationConfig, targets: dict[str, nn.Module | None],
                 group_sizes: dict[str, int | None], report: QuantizationReport, rollback: Rollback):
        self.model, self.config, self.targets, self.group_sizes = model, config, targets, group_sizes
        self.report, self.rollback = report, rollback
        self.generator = torch.Generator().manual_seed(config.seed)
        self.handler = METHODS[config.method]
        self.plan = S.SharingPlan()

    def inside(self, layer_name: str) -> dict[str, nn.Module]:
        """The targets still to quantize in the decoder layer ``layer_name`` (full names)."""
        return {n: m for n, m in self.targets.items()
                if m is not None and (n == layer_name or n.startswith(layer_name + "."))}

    def remaining(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.targets.items() if m is not None}

    def solve(self, layer, layer_name, layer_targets: dict[str, Target], probe=None) -> dict[str, tuple]:
        """Quantize ``layer_targets``: name -> (target, result, RTN error before). Only AWQ touches the model
        (it folds scales into the layer's weights): the rollback keeps their values first."""
        config = self.config
        _check_finite_stats(layer_name, layer_targets)
        if config.method == "awq":
            self.rollback.modified(*layer.parameters())
        before = {n: _rtn_error(t.weight, t.group_size, t.hessian, config) for n, t in layer_targets.items()}
        results = self.handler(layer, layer_name, layer_targets, config, self.generator, probe)
        return {name: (t, results[name], before[name]) for name, t in layer_targets.items()}

    def install(self, solved: dict[str, tuple]) -> None:
        for name, (t, result, before) in solved.items():
            _install(self.model, t, result, self.config, self.rollback)
            self.targets[name] = None  # drop our reference: the float weight can be freed (unless rollback keeps it)
            self.report.layers.append(LayerReport(
                name=name, bits=self.config.bits, group_size=t.group_size,
                fallback=t.group_size != self.config.group_size, error_before=before, error_after=result.error,
                metric="weight" if t.stats is None else "output", extra=result.extra))

    def run_one_pass(self, layer, layer_name, inside: dict[str, nn.Module], inputs: C.LayerInputs,
                     propagate: bool) -> None:
        """GPTQ's true-sequential order in one forward pass (:mod:`.sequential`): each group of linears is
        quantized, and its weights replaced in place by their dequantized values, when the batches reach it;
        the CompressedLinear modules are installed once the pass is over."""
        solved: dict[str, tuple] = {}

        def quantize_group(names: list[str], stats: C.InputStats) -> None:
            group = self.solve(layer, layer_name,
                               {n: Target(n, inside[n], self.group_sizes[n], stats) for n in names})
            for name, (t, result, _) in group.items():
                approx = P.dequantize(result.codes, result.scale, result.zero_point, t.group_size)
                self.rollback.modified(t.module.weight)
                C.linear_weight(t.module).copy_(approx)  # an (out, in) view also of a Conv1D weight
            solved.update(group)

        missed = S.quantize_layer_in_one_pass(layer, inputs, inside, quantize_group, self.plan, layer_name,
                                              propagate)
        if missed:  # left in ``targets``: the RTN pass takes them
            logger.warning("%s: no calibration batch reached %s; quantized with round-to-nearest instead",
                           layer_name, ", ".join(missed))
        self.install({name: solved[name] for name in inside if name in solved})

    def quantize_layer(self, layer_name: str, layer: nn.Module, inputs: C.LayerInputs, autocast,
                       one_pass: bool, propagate: bool) -> None:
        """Quantize the targets inside decoder layer ``layer_name`` from its calibration ``inputs``; with
        ``propagate``, replace ``inputs``' hidden states by the quantized layer's outputs (the next layer's
        inputs). ``one_pass``: GPTQ in one forward pass (:meth:`run_one_pass`)."""
        inside = self.inside(layer_name)
        if inside and one_pass:
            with autocast():
                self.run_one_pass(layer, layer_name, inside, inputs, propagate)
            if propagate:
                _check_finite_activations(inputs, f"the outputs of decoder layer {layer_name}")
            return  # the pass has already produced the next layer's inputs
        if inside:
            with autocast():
                stats = C.collect_stats(layer, inside, inputs)
            self.install(self.solve(
                layer, layer_name, {n: Target(n, m, self.group_sizes[n], stats[n]) for n, m in inside.items()},
                probe=C.LayerProbe(layer, inputs, autocast)))
            layer = self.model.get_submodule(layer_name)  # the layer itself may have been a target
        if propagate:  # the last layer's outputs feed nothing that is calibrated
            with dequantized_weights_cached(layer), autocast():
                C.propagate(layer, inputs)  # the quantized layer's outputs feed the next one
            _check_finite_activations(inputs, f"the outputs of decoder layer {layer_name}")

    def quantize_uncalibrated(self, modules: dict[str, nn.Module], progress: bool = False) -> None:
        """Round ``modules`` (name -> linear: those outside the decoder layers, or never called) to nearest,
        without calibration statistics, and install them."""
        config = self.config
        bar = tqdm(modules.items(), desc=f"rtn {config.bits}-bit", disable=not progress, unit="layer")
        for name, module in bar:
            target = Target(name, module, self.group_sizes[name])
            result, layer_report = rtn_without_data(name, target.weight, target.group_size, config, self.generator)
            _install(self.model, target, result, config, self.rollback)
            self.targets[name] = None
            self.report.layers.append(layer_report)
