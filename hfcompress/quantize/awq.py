"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Input channels that carry large activations matter most. AWQ multiplies them by ``s > 1`` before
quantization (``W' = W diag(s)``) and divides the preceding operation's output by ``s``, so the layer
computes the same function while the important weights lose less precision (sec. 3.2, eq. 4-5). The scale
is ``s = mean|x|^alpha`` with ``alpha`` found by grid search (eq. 5), followed by a clipping search.

Both searches minimise the layers' output error ``tr((W - Q(W)) H (W - Q(W))^T)`` computed from the input
second moment ``H = E[x x^T]`` — the same quantity AWQ measures on cached activations, without keeping them.
(AWQ measures the error after the whole attention/MLP block for some groups; we measure each linear's
output, the standard simplification.)
"""

from __future__ import annotations

import torch
from torch import nn

from . import primitives as P
from .calibrate import is_conv1d

AWQ_GRID = 20

# Which operation feeds which linears, per architecture family, relative to a decoder layer: the scale of
# the linears' inputs is folded into the output of the first entry (AutoAWQ/llm-compressor use the same
# pairs). A pair is used only when every module exists and the shapes fit (e.g. not v_proj -> o_proj with
# grouped-query attention).
SCALE_MAPPINGS: list[tuple[str, tuple[str, ...]]] = [
    # Llama, Mistral, Qwen2 (and other Llama-like decoders)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    # OPT
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    # GPT-2 (Conv1D)
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
    # BERT-style encoders (their LayerNorms also feed the residual branch: nothing to fold into them)
    ("attention.self.value", ("attention.output.dense",)),
]


def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor, bits: int,
                 group_size: int | None, symmetric: bool, grid: int = AWQ_GRID) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale ``s`` (in,) for linears sharing one input, and the chosen ``alpha``.

    ``s = abs_mean**alpha``, normalised to geometric mean 1 of its extremes as in AWQ, with ``alpha`` in
    ``{0, 1/grid, ..., (grid-1)/grid}`` minimising the summed output error of ``Q(W s) / s``. ``alpha = 0``
    (``s = 1``) is plain quantization, so the choice is never worse than it on this objective.
    """
    hessian = hessian.float()
    weights = [w.float() for w in weights]
    best_err, best_alpha = float("inf"), 0.0
    best_scale = torch.ones_like(abs_mean, dtype=torch.float32)
    for step in range(grid):
        alpha = step / grid
        s = abs_mean.float().pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            approx = P.fake_quantize(w * s, bits, group_size, symmetric) / s
            err += P.output_error(w - approx, hessian).item()
        if err < best_err:
            best_err, best_alpha, best_scale = err, alpha, s
    return best_scale, best_alpha


@torch.no_grad()
def scale_inputs(linears: list[nn.Module], scale: torch.Tensor) -> None:
    """Multiply the input columns of each linear (nn.Linear (out, in) or Conv1D (in, out)) by ``scale``."""
    for module in linears:
        s = scale.to(module.weight.device, module.weight.dtype)
        module.weight.mul_(s.unsqueeze(1) if is_conv1d(module) else s.unsqueeze(0))


@torch.no_grad()
def divide_output(module: nn.Module, scale: torch.Tensor) -> None:
    """Divide the output channels of ``module`` (a norm, nn.Linear or Conv1D) by ``scale`` (C,), in place."""
    scale = scale.to(module.weight.device)
    if is_conv1d(module):  # weight (in, out)
        module.weight.div_(scale.to(module.weight.dtype).unsqueeze(0))
    elif isinstance(module, nn.Linear):  # weight (out, in)
        module.weight.div_(scale.to(module.weight.dtype).unsqueeze(1))
    else:  # LayerNorm / RMSNorm: y = norm(x) * weight (+ bias)
        module.weight.div_(scale.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.div_(scale.to(module.bias.dtype))


def output_channels(module: nn.Module) -> int | None:
    """Number of output channels whose scale can be folded into ``module``; None if it cannot take one."""
    if is_conv1d(module):
        return module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.out_features
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    # Norms whose output is ``normalized * weight``. Gemma's RMSNorm multiplies by (1 + weight): skip it.
    if ("LayerNorm" in name or "RMSNorm" in name) and not name.startswith("Gemma") \
            and isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.shape[0]
    return None


def layer_mappings(layer: nn.Module, quantized: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The :data:`SCALE_MAPPINGS` that apply to ``layer`` (relative names) given the linears it quantizes."""
    modules = dict(layer.named_modules())
    found, used = [], set()
    for prev, linears in SCALE_MAPPINGS:
        if prev not in modules or not all(n in modules and n in quantized for n in linears):
            continue
        if used & set(linears):
            continue
        in_features = {modules[n].weight.shape[0] if is_conv1d(modules[n]) else modules[n].in_features
                       for n in linears}
        if len(in_features) != 1 or output_channels(modules[prev]) != in_features.pop():
            continue
        found.append((prev, linears))
        used |= set(linears)
    return found
