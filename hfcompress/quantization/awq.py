"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Input channels that carry large activations matter most. AWQ multiplies them by ``s > 1`` before
quantization (``W' = W diag(s)``) and divides the preceding operation's output by ``s``, so the layer
computes the same function while the important weights lose less precision (sec. 3.2, eq. 4-5). The scale
is ``s = mean|x|^alpha`` with ``alpha`` found by grid search (eq. 5), followed by a clipping search.

What the scale search minimises depends on where the scaled linears' outputs go, as in the paper (and
AutoAWQ / llm-compressor, which measure it at the output of the linears' common parent module):

* Several linears sharing one input (q/k/v, gate/up): the error at the output of the block that holds them
  (the attention block, the MLP), measured by re-running that block on cached calibration inputs with the
  linears replaced by ``Q(W s) / s`` (:func:`block_error`). q/k errors only matter through the attention
  scores and gate errors through the activation and the product with up, while a per-linear error weighs
  them like v/up errors. On the `base` reference teacher (fp32 perplexity 43.411; int4, group 128, three
  calibration draws) the block objective gave mean perplexity 43.440 (43.422 / 43.470 / 43.428) against
  43.502 for the per-linear objective and 43.453 for plain round-to-nearest, and mean KL divergence to the
  fp32 model 1.27e-3 nats/token against 1.32e-3 and 1.71e-3: a small gain, within the spread between draws
  in perplexity. At int3 the two objectives tie (mean 43.853 vs 43.851; round-to-nearest 44.145). The block
  re-runs make AWQ about 2.7x slower on that model.
* A single linear (o_proj, down_proj): its own output error ``tr((W - Q(W)) H (W - Q(W))^T)`` from the
  input second moment ``H = E[x x^T]`` over all calibration tokens — exactly the mean squared output error
  on the cached activations (the parent block of a single linear is the linear), without keeping them.

Every candidate is quantized at the layer's effective group size (the fallback one where ``group_size``
does not divide the width). The clipping search then minimises each group's own output error
(``d_g H_gg d_g^T``, AWQ's auto-clip).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import calibrate as C
from . import primitives as P
from .calibrate import is_conv1d

AWQ_GRID = 20  # scale candidates alpha = 0, 1/20, ..., 19/20 (AutoAWQ's n_grid)
# AWQ's auto-clip (sec. 3.3): after the scales are folded, search each group's clipping ratio on its output error.
AWQ_CLIP = True

# Which operation feeds which linears, per architecture family, relative to a decoder layer: the scale of
# the linears' inputs is folded into the output of the first entry (AutoAWQ/llm-compressor use the same
# pairs). A pair is used only when every module exists and the shapes fit (e.g. not v_proj -> o_proj with
# grouped-query attention), and the first pair that claims a linear wins. ``name@k/n`` is the k-th of n equal
# chunks of a fused linear's output rows (Phi-3's qkv_proj = [q | k | v], gate_up_proj = [gate | up]).
SCALE_MAPPINGS: list[tuple[str, tuple[str, ...]]] = [
    # Llama, Mistral, Qwen2/Qwen3 (and other Llama-like decoders)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    # Gemma 2/3: the MLP reads pre_feedforward_layernorm; their post_attention_layernorm normalises the
    # attention output before the residual add, so it must not take the gate/up scale (listed first to win).
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    # Phi-3 (fused projections; v -> o only without grouped-query attention, when the thirds are equal)
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("self_attn.qkv_proj@2/3", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ("mlp.gate_up_proj@1/2", ("mlp.down_proj",)),
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


# Calibration tokens on which the block error of a scale search is measured: the first calibration batches,
# until they hold this many token positions (the first rows of pre-tokenized data; a seeded random draw of
# text). Each block search re-runs the block AWQ_GRID times on them, so this bounds its cost, which grows with
# tokens, not sequences: counted in sequences, the same setting cost twice as much on 512-token sequences as
# on the 256-token ones it was chosen on. On the `base` teacher (256-token sequences, int4 g128, three
# calibration draws) 16 sequences (4,096 tokens) gave mean perplexity 43.459 against 43.440 for 32 (8,192
# tokens; worse on every draw) at 0.7x the time; 64 and 128 sequences were only tried on one draw.
AWQ_SEARCH_TOKENS = 8192


def scale_candidates(abs_mean: torch.Tensor, grid: int | None = None):
    """``(alpha, s)`` for ``alpha`` in ``{0, 1/grid, ..., (grid-1)/grid}``: ``s = abs_mean**alpha`` (clamped
    at 1e-4), normalised so that ``sqrt(max(s) * min(s)) = 1`` as in AWQ. ``alpha = 0`` gives ``s = 1``.
    ``grid``: None reads :data:`AWQ_GRID` when called (so a defaults sweep can change it)."""
    grid = AWQ_GRID if grid is None else grid
    abs_mean = abs_mean.float()
    for step in range(grid):
        alpha = step / grid
        s = abs_mean.pow(alpha).clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor, bits: int,
                 group_size: int | None, symmetric: bool, grid: int | None = None,
                 error=None) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale ``s`` (in,) for linears sharing one input, and the chosen ``alpha``.

    Each candidate of :func:`scale_candidates` turns every weight (out, in) into ``Q(W s) / s`` (min-max
    round-to-nearest at ``bits``/``group_size``: the layer's effective group size, fallback included), and
    the candidate with the smallest ``error`` wins. ``error(approx)`` receives that list of float32 weights
    (in the order of ``weights``) and returns a float; the default is the summed per-linear output error
    ``tr((W - approx) H (W - approx)^T)`` under ``hessian``. ``alpha = 0`` (``s = 1``: plain quantization)
    is evaluated first and only a strictly smaller error replaces it, so the choice is never worse than
    plain quantization on the objective.
    """
    weights = [w.float() for w in weights]
    if error is None:
        hessian = hessian.float()

        def error(approx):
            return sum(P.output_error(w - a, hessian).item() for w, a in zip(weights, approx))

    best_err, best_alpha = float("inf"), 0.0
    best_scale = torch.ones_like(abs_mean, dtype=torch.float32)
    for alpha, s in scale_candidates(abs_mean, grid):
        err = error([P.fake_quantize(w * s, bits, group_size, symmetric) / s for w in weights])
        if err < best_err:
            best_err, best_alpha, best_scale = err, alpha, s
    return best_scale, best_alpha


def common_parent(names: list[str] | tuple[str, ...]) -> str:
    """Deepest module containing all of ``names`` (dotted, relative): ``self_attn`` for q/k/v, ``mlp`` for
    gate/up, the name itself for a single module, ``""`` (the layer) if they share no prefix."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def block_error(parent: nn.Module, linears: list[nn.Module], calls: list[C.ModuleCall], autocast=None):
    """The ``error`` of :func:`search_scale` measured at the output of ``parent`` (a block containing
    ``linears``): mean squared difference between ``parent``'s recorded float outputs ``calls`` (see
    :func:`.calibrate.capture_module_calls`) and its outputs with the linears' weights replaced by the given
    (out, in) approximations. The linears' weights are restored after every evaluation. ``autocast``: a
    zero-argument callable giving the context to run ``parent`` in (that of the recorded calls)."""
    autocast = autocast or contextlib.nullcontext

    originals = [m.weight.detach().clone() for m in linears]

    @torch.no_grad()
    def error(approx: list[torch.Tensor]) -> float:
        try:
            for module, weight in zip(linears, approx):
                module.weight.copy_(weight.t() if is_conv1d(module) else weight)
            total, count = 0.0, 0
            for call in calls:
                with autocast():
                    out = C.layer_output(parent(*call.args, **call.kwargs))
                total += (out.float() - call.output.float()).pow(2).sum().item()
                count += call.output.numel()
        finally:
            for module, original in zip(linears, originals):
                module.weight.copy_(original)
        return total / max(count, 1)

    return error


@torch.no_grad()
def scale_inputs(linears: list[nn.Module], scale: torch.Tensor) -> None:
    """Multiply the input columns of each linear (nn.Linear (out, in) or Conv1D (in, out)) by ``scale``."""
    for module in linears:
        s = scale.to(module.weight.device, module.weight.dtype)
        module.weight.mul_(s.unsqueeze(1) if is_conv1d(module) else s.unsqueeze(0))


def split_chunk(prev: str) -> tuple[str, int, int]:
    """``"mlp.gate_up_proj@1/2"`` -> ``("mlp.gate_up_proj", 1, 2)``; a plain name -> ``(name, 0, 1)``."""
    name, _, chunk = prev.partition("@")
    if not chunk:
        return name, 0, 1
    index, _, count = chunk.partition("/")
    return name, int(index), int(count)


def _is_offset_norm(module: nn.Module) -> bool:
    """Gemma's RMSNorms compute ``normalized * (1 + weight)`` instead of ``normalized * weight``."""
    return type(module).__name__.startswith("Gemma") and "RMSNorm" in type(module).__name__


@torch.no_grad()
def divide_output(module: nn.Module, scale: torch.Tensor, chunk: tuple[int, int] = (0, 1)) -> None:
    """Divide the output channels of ``module`` (a norm, nn.Linear or Conv1D) by ``scale`` (C,), in place.

    ``chunk = (k, n)``: only the k-th of n equal slices of a linear's output channels (a fused projection).
    """
    scale = scale.to(module.weight.device)
    index, count = chunk
    if is_conv1d(module):  # weight (in, out)
        width = module.weight.shape[1] // count
        rows = slice(index * width, (index + 1) * width)
        module.weight[:, rows] /= scale.to(module.weight.dtype).unsqueeze(0)
    elif isinstance(module, nn.Linear):  # weight (out, in)
        width = module.out_features // count
        rows = slice(index * width, (index + 1) * width)
        module.weight[rows] /= scale.to(module.weight.dtype).unsqueeze(1)
    elif _is_offset_norm(module):  # y = norm(x) * (1 + w): (1 + w') = (1 + w) / s
        rows = slice(None)
        module.weight.copy_((1 + module.weight.float()).div_(scale.float()).sub_(1).to(module.weight.dtype))
    else:  # LayerNorm / RMSNorm: y = norm(x) * weight (+ bias)
        rows = slice(None)
        module.weight.div_(scale.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias[rows] /= scale.to(module.bias.dtype)


def fold_into(modules: dict[str, nn.Module], prev: str, scale: torch.Tensor) -> None:
    """Divide the output of the mapping's first entry ``prev`` (a name, or ``name@k/n``) by ``scale``."""
    name, index, count = split_chunk(prev)
    divide_output(modules[name], scale, (index, count))


def output_channels(module: nn.Module, count: int = 1) -> int | None:
    """Number of output channels whose scale can be folded into ``module`` (one of ``count`` equal chunks of
    them); None if it cannot take one."""
    if is_conv1d(module) or isinstance(module, nn.Linear):
        width = module.weight.shape[1] if is_conv1d(module) else module.out_features
        return width // count if width % count == 0 else None
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    # Norms whose output is ``normalized * weight`` (Gemma's: ``normalized * (1 + weight)``, see divide_output).
    if count == 1 and ("LayerNorm" in name or "RMSNorm" in name) and isinstance(weight, torch.Tensor) \
            and weight.ndim == 1:
        return weight.shape[0]
    return None


def layer_mappings(layer: nn.Module, quantized: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The :data:`SCALE_MAPPINGS` that apply to ``layer`` (relative names) given the linears it quantizes."""
    modules = dict(layer.named_modules())
    found, used = [], set()
    for prev, linears in SCALE_MAPPINGS:
        name, _, count = split_chunk(prev)
        if name not in modules or not all(n in modules and n in quantized for n in linears):
            continue
        if used & set(linears):
            continue
        in_features = {modules[n].weight.shape[0] if is_conv1d(modules[n]) else modules[n].in_features
                       for n in linears}
        if len(in_features) != 1 or output_channels(modules[name], count) != in_features.pop():
            continue
        found.append((prev, linears))
        used |= set(linears)
    return found
