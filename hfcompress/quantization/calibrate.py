"""Layer-by-layer calibration: calibration data -> token blocks -> the inputs of one decoder layer at a time.

The driver never holds more than one layer's inputs: it captures what the model feeds its first decoder
layer (hidden states plus keyword arguments such as the attention mask and rotary embeddings), then for
each layer collects per-linear statistics (input second moment ``E[x x^T]`` and mean ``|x|``), lets the
method quantize the layer, and runs the *quantized* layer to produce the next layer's inputs (GPTQ's
sequential scheme: later layers are calibrated on the outputs of the already-quantized ones). GPTQ by default
does both in one pass per layer instead (:mod:`.sequential`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.data import check_block_size, load_texts, pack_stream, token_stream
from ..core.errors import ConfigError, DataError
from . import primitives as P

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 8  # sequences per forward pass while calibrating


# --------------------------------------------------------------------------------------------------------
# Calibration data -> (N, T) token ids
# --------------------------------------------------------------------------------------------------------
MIN_CALIBRATION_TOKENS = 128  # below this, input statistics are mostly noise: refused (see calibration_blocks)


def calibration_blocks(data, tokenizer, num_samples: int, seq_len: int, seed: int = 0,
                       model_config=None) -> torch.Tensor:
    """Calibration data -> LongTensor (N, T): ``num_samples`` sequences of ``seq_len`` tokens when the data
    holds that many tokens, else all of it (with a warning).

    ``data`` is a pre-tokenized LongTensor (N, T) (its first ``num_samples`` rows are used), or any text
    source of :func:`hfcompress.core.data.load_texts` (a list of strings, a ``datasets.Dataset``, ``"stdlib"``,
    a path...). Texts are samples: they are concatenated (EOS between them) and cut into sequences, so a list
    of short sentences is used whole rather than refused for not filling ``num_samples`` sequences. With
    enough text, ``num_samples`` of the ``seq_len``-token blocks are drawn with ``seed``. With less, every
    token is used: the stream is cut into ``ceil(tokens / seq_len)`` equal sequences of at most ``seq_len``
    tokens (no padding, at most a few tokens of tail dropped) and a warning says how much was asked and found.
    Fewer than :data:`MIN_CALIBRATION_TOKENS` tokens in all is refused.
    """
    if model_config is not None:
        check_block_size(seq_len, model_config)
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int64, torch.int32) or data.numel() == 0:
            raise DataError(f"pre-tokenized calibration data must be a non-empty (N, T) LongTensor of token ids, "
                            f"got {tuple(data.shape)} {data.dtype}")
        if data.shape[1] < 2:
            raise DataError(f"calibration sequences must hold at least 2 tokens, got {data.shape[1]}")
        if model_config is not None:
            check_block_size(data.shape[1], model_config)
            vocab = getattr(model_config, "vocab_size", None)
            if vocab is not None and (data.min() < 0 or data.max() >= vocab):
                raise DataError(f"calibration token ids must be in [0, {vocab}) (the model's vocab_size), "
                                f"got ids in [{int(data.min())}, {int(data.max())}]")
        _check_enough(data.numel(), f"{data.shape[0]} sequences of {data.shape[1]} tokens")
        if data.shape[0] < num_samples:
            _warn_fewer(data.numel(), num_samples, data.shape[1],
                        f"using all {data.shape[0]} sequences of {data.shape[1]} tokens")
        return data[:num_samples].long()
    if tokenizer is None:
        raise DataError("text calibration data needs a tokenizer: pass tokenizer=... to quantize(), "
                        "or pass a pre-tokenized (N, T) LongTensor")
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("calibration data is an empty list; pass texts, a dataset, 'stdlib' or token ids")
    texts = [t for t in load_texts(data) if t]
    if not texts:
        raise DataError("calibration data holds no non-empty text")
    # Tokenize only what is needed: documents in a seeded random order until they hold (generously, at
    # >= 1 character per token) enough tokens, growing the pool if they still fall short.
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    wanted = num_samples * seq_len
    budget = 8 * wanted
    while True:
        chosen, chars = [], 0
        for i in order:
            chosen.append(texts[i])
            chars += len(texts[i])
            if chars >= budget:
                break
        stream = token_stream(chosen, tokenizer)  # (tokens,), EOS between documents
        if stream.numel() >= wanted or len(chosen) == len(texts):
            break
        budget *= 4
    if stream.numel() >= wanted:
        blocks = pack_stream(stream, seq_len)  # (M >= num_samples, seq_len)
        order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
        return blocks[order]
    tokens = stream.numel()
    _check_enough(tokens, f"{len(texts)} text(s)")
    count = math.ceil(tokens / seq_len)  # <= num_samples, since tokens < num_samples * seq_len
    length = tokens // count  # <= seq_len; drops fewer than ``count`` tokens
    _warn_fewer(tokens, num_samples, seq_len, f"using {count} sequence(s) of {length} tokens")
    return stream[:count * length].view(count, length)


def _check_enough(tokens: int, what: str) -> None:
    if tokens < MIN_CALIBRATION_TOKENS:
        raise DataError(f"calibration data holds only {tokens} tokens ({what}); at least "
                        f"{MIN_CALIBRATION_TOKENS} are needed to estimate a layer's input statistics: pass more "
                        f"text (e.g. calibration_data='stdlib')")


def _warn_fewer(tokens: int, num_samples: int, seq_len: int, using: str) -> None:
    warnings.warn(f"calibration data holds {tokens} tokens, fewer than the {num_samples} x {seq_len} = "
                  f"{num_samples * seq_len} asked (num_samples x seq_len); {using}. Pass more text for steadier "
                  f"statistics, or lower num_samples/seq_len to silence this", UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# Finding the decoder layers
# --------------------------------------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """Exact name, a dotted suffix (``lm_head`` matches ``model.lm_head``), or ``re:<regex>`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_sequential_layers(model: nn.Module, targets: list[str] | None,
                           contains: set[str]) -> list[tuple[str, nn.Module]]:
    """The decoder layers, in execution order.

    With ``targets`` (``sequential_targets``), the modules whose names match. Otherwise the children of the
    ``nn.ModuleList`` holding the most layers of one class that contain quantized linears
    (``model.layers``, ``transformer.h``, ``encoder.layer``, ``decoder.layers``...). ``contains`` is the set
    of names of the linears to quantize.
    """
    if targets:
        found = [(n, m) for n, m in model.named_modules() if n and any(matches(n, p) for p in targets)]
        if not found:
            raise ConfigError(f"sequential_targets {targets} match no module of {type(model).__name__}; "
                              f"name the decoder layers, e.g. ['re:model\\.layers\\.\\d+']")
        nested = [n for n, _ in found if any(n.startswith(o + ".") for o, _ in found)]
        if nested:
            raise ConfigError(f"sequential_targets match nested modules (e.g. {nested[0]!r}); "
                              f"match only the decoder layers themselves")
        return found
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        children = [(f"{name}.{i}" if name else str(i), child) for i, child in enumerate(module)]
        if len({type(c) for _, c in children}) != 1:
            continue
        if not all(any(t.startswith(n + ".") for t in contains) for n, _ in children):
            continue
        if len(children) > len(best):
            best = children
    if not best:
        raise ConfigError(
            f"could not find the decoder layers of {type(model).__name__} (no nn.ModuleList of identical "
            f"blocks holding the layers to quantize); set QuantizationConfig(sequential_targets=[...]) to "
            f"their names, e.g. ['re:model\\.layers\\.\\d+']")
    return best


# --------------------------------------------------------------------------------------------------------
# Layer inputs and statistics
# --------------------------------------------------------------------------------------------------------
def calibration_autocast(model: nn.Module, dtype_name: str | None):
    """``torch.autocast`` in ``dtype_name`` on the model's device for the calibration forward passes, or a
    no-op context for None (or the model's own dtype)."""
    if dtype_name is None:
        return contextlib.nullcontext()
    dtype = getattr(torch, dtype_name)
    first = next(model.parameters(), None)
    if first is not None and first.dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_model_device(model).type, dtype=dtype)


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@dataclass
class LayerInputs:
    """Positional and keyword inputs of a decoder layer, one entry per calibration batch.

    ``layer_kwargs``: for models whose layers do not all receive the same keyword inputs (Gemma 3's sliding-
    window and global layers get different attention masks and rotary tables; Qwen2/3 with
    ``use_sliding_window``), the keyword inputs that differ from the first layer's, per layer index and
    batch size (:func:`capture_layer_kwargs`); applied by :func:`use_layer_kwargs`. Empty otherwise.
    """

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    layer_kwargs: dict[int, dict[int, dict]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.args)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, first_layer: nn.Module, blocks: torch.Tensor,
                               batch_size: int = CALIBRATION_BATCH) -> LayerInputs:
    """Run the model on ``blocks`` (N, T) up to ``first_layer`` and record what it receives."""
    inputs = LayerInputs()

    def hook(module, args, kwargs):
        inputs.args.append(tuple(args))
        inputs.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = _model_device(model)
    extra = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        extra["use_cache"] = False  # no KV cache objects in the captured kwargs
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, **extra)
            except _StopForward:
                continue
            raise ConfigError(f"the model never called its decoder layer {type(first_layer).__name__}; "
                              f"check sequential_targets")
    finally:
        handle.remove()
    return inputs


def has_mixed_layer_types(model: nn.Module) -> bool:
    """Whether the config says the decoder layers differ in attention type (``config.layer_types``)."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    return isinstance(layer_types, (list, tuple)) and len(set(layer_types)) > 1


@torch.no_grad()
def capture_layer_kwargs(model: nn.Module, layers: list[nn.Module], blocks: torch.Tensor, inputs: LayerInputs,
                         batch_size: int = CALIBRATION_BATCH) -> None:
    """Fill ``inputs.layer_kwargs``: what each decoder layer receives besides the hidden states, where it
    differs from the first layer's, for every batch size of the calibration batches.

    A model computes its attention masks and rotary tables once per forward and hands each layer the one of
    its attention type (``causal_mask_mapping[config.layer_types[i]]``), so reusing the first layer's inputs
    would run a global-attention layer under the sliding-window mask. Calibration blocks have no padding, so
    these inputs depend only on the batch's shape: one forward per distinct batch size (stopped before the
    last layer runs) records them. Only for models with mixed ``layer_types``; a no-op otherwise.
    """
    if not has_mixed_layer_types(model) or len(layers) < 2:
        return
    device = _model_device(model)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    sizes = sorted({min(batch_size, blocks.shape[0] - start) for start in range(0, blocks.shape[0], batch_size)})
    for size in sizes:
        seen: list[dict] = []

        def hook(module, args, kwargs):
            seen.append(dict(kwargs))
            if len(seen) == len(layers):
                raise _StopForward

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            model(input_ids=blocks[:size].to(device), **extra)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        first = seen[0]
        for index, kwargs in enumerate(seen[1:], start=1):
            differ = {k: v for k, v in kwargs.items() if k != "hidden_states" and not _same_input(v, first.get(k))}
            if differ:
                inputs.layer_kwargs.setdefault(index, {})[size] = differ


def _same_input(a, b) -> bool:
    """The same object (or tuple of the same objects): what a model passes to layers of one attention type."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


def use_layer_kwargs(inputs: LayerInputs, index: int, first_kwargs: list[dict]) -> None:
    """Set every batch's keyword inputs to those of decoder layer ``index``: ``first_kwargs`` (the first
    layer's, per batch) updated with :attr:`LayerInputs.layer_kwargs`; the current hidden states are kept."""
    if not inputs.layer_kwargs:
        return
    for i, args in enumerate(inputs.args):
        hidden = inputs.kwargs[i].get("hidden_states")
        size = hidden_states(inputs, i).shape[0]
        kwargs = {**first_kwargs[i], **inputs.layer_kwargs.get(index, {}).get(size, {})}
        if hidden is not None:
            kwargs["hidden_states"] = hidden
        inputs.kwargs[i] = kwargs


def layer_output(output):
    """Hidden states out of a decoder layer's return value (a tensor, or a tuple whose first item is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def propagate(layer: nn.Module, inputs: LayerInputs) -> None:
    """Replace each batch's hidden states by the layer's output (the next layer's input), in place."""
    for i, (args, kwargs) in enumerate(zip(inputs.args, inputs.kwargs)):
        set_layer_output(inputs, i, layer(*args, **kwargs))


def hidden_states(inputs: LayerInputs, i: int) -> torch.Tensor:
    """Batch ``i``'s hidden states: the layer's first positional input, or its ``hidden_states`` keyword."""
    args, kwargs = inputs.args[i], inputs.kwargs[i]
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ConfigError("cannot tell which input of the decoder layer is the hidden state (no positional "
                          "argument nor 'hidden_states'); check sequential_targets")
    return hidden


def set_layer_output(inputs: LayerInputs, i: int, output) -> None:
    """Replace batch ``i``'s hidden states by ``output``, a decoder layer's return value on that batch. The
    hidden states keep the input's dtype, also when the layer ran under autocast in a narrower one."""
    hidden = layer_output(output).to(hidden_states(inputs, i).dtype)
    args, kwargs = inputs.args[i], inputs.kwargs[i]
    if args:
        inputs.args[i] = (hidden,) + tuple(args[1:])
    else:  # passed by keyword
        inputs.kwargs[i] = {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def run_first_batch(layer: nn.Module, inputs: LayerInputs) -> torch.Tensor:
    """The layer's hidden-state output on the first calibration batch (to check reparametrizations)."""
    return layer_output(layer(*inputs.args[0], **inputs.kwargs[0])).detach().clone()


@dataclass
class ModuleCall:
    """What a sub-module of a layer received on one calibration batch, and what it returned."""

    args: tuple
    kwargs: dict
    output: torch.Tensor  # its (first) output, detached


def batch_tokens(args: tuple, kwargs: dict) -> int:
    """Token positions in one batch of a layer's inputs: batch x sequence of its hidden states (B, T, H)
    (padding included: re-running the layer costs the same for it); 1 if they are not a tensor."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim < 2:
        return 1
    return math.prod(hidden.shape[:-1])


@torch.no_grad()
def capture_module_calls(layer: nn.Module, module: nn.Module, inputs: LayerInputs,
                         max_tokens: int | None = None) -> list[ModuleCall]:
    """Run ``layer`` on its calibration batches and record each call of ``module`` (one of its sub-modules,
    or the layer itself): its positional/keyword inputs and output, so that ``module`` can be re-run on them
    alone. Each batch stops right after ``module`` has run. ``max_tokens``: stop after the batch that
    reaches this many token positions (:func:`batch_tokens`; all batches if None). Empty if ``module`` is
    never called."""
    calls: list[ModuleCall] = []

    def hook(mod, args, kwargs, output):
        calls.append(ModuleCall(tuple(args), dict(kwargs), layer_output(output).detach()))
        raise _StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    tokens = 0
    try:
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            if max_tokens is not None and tokens >= max_tokens:
                break
            try:
                layer(*args, **kwargs)
            except _StopForward:
                pass
            tokens += batch_tokens(args, kwargs)
    finally:
        handle.remove()
    return calls


class LayerProbe:
    """Access to one layer's calibration inputs for the methods: calling it returns the layer's output on the
    first batch (:func:`run_first_batch`, in full precision, to check that a reparametrization kept the
    function); ``inputs`` holds every batch (e.g. for :func:`capture_module_calls`) and ``autocast()`` is
    the context of the calibration forward passes (:func:`calibration_autocast`; a no-op by default)."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs, autocast=None):
        self.layer, self.inputs = layer, inputs
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self) -> torch.Tensor:
        return run_first_batch(self.layer, self.inputs)


@dataclass
class InputStats:
    """Statistics of one linear layer's inputs: ``E[x x^T]`` (in, in) and ``E|x|`` (in,), the latter only if
    ``abs_mean`` starts as a tensor (AWQ's; None skips it)."""

    hessian: torch.Tensor
    abs_mean: torch.Tensor | None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        n = rows.shape[0]
        total = self.count + n
        if self.abs_mean is not None:
            self.abs_mean.mul_(self.count / total).add_(rows.abs().sum(0), alpha=1.0 / total)
        self.hessian, self.count = P.accumulate_hessian(self.hessian, self.count, rows)


class _ShareMismatch(Exception):
    """Linears that shared one input tensor on the first batch did not on a later one."""


@torch.no_grad()
def collect_stats(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs,
                  share: bool = True) -> dict[str, InputStats]:
    """Run ``layer`` on its inputs and gather :class:`InputStats` for each of ``modules`` (name -> linear).

    Linears fed the very same tensor (q/k/v projections, gate/up projections) get one shared
    :class:`InputStats` object: ``E[x x^T]`` is accumulated once for them, and the methods can treat them as
    one wider matrix with one Hessian. Each batch stops as soon as every one of ``modules`` has seen its
    input: the rest of the layer is not needed.
    """
    stats: dict[str, InputStats] = {}
    pending: set[str] = set()
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's distinct inputs and the first linear fed each
    leader: dict[str, str] = {}  # linear -> the linear whose statistics it shares (decided on batch 0)
    first_batch = True
    handles = []

    def hook(name, args):
        x = args[0]
        owner = next((n for t, n in seen if t is x), None) if share else None
        if first_batch:
            leader[name] = owner or name
            if owner is None:
                seen.append((x, name))
                stats[name].add(x.detach())
            else:
                stats[name] = stats[owner]
        elif leader[name] != (owner or name):
            raise _ShareMismatch
        elif owner is None:
            seen.append((x, name))
            stats[name].add(x.detach())
        pending.discard(name)
        if not pending:
            raise _StopForward

    for name, module in modules.items():
        in_features = linear_shape(module)[1]
        device = next(module.parameters()).device
        stats[name] = InputStats(torch.zeros(in_features, in_features, device=device),
                                 torch.zeros(in_features, device=device))
        # A pre-hook: the batch can stop before the last linear computes anything.
        handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: hook(name, args)))
    try:
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            pending.update(modules)
            seen.clear()
            try:
                layer(*args, **kwargs)
            except _StopForward:
                pass
            first_batch = False
    except _ShareMismatch:
        mismatch = True
    else:
        mismatch = False
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    if mismatch:
        logger.debug("linears of %s do not always share inputs; collecting their statistics separately",
                     type(layer).__name__)
        return collect_stats(layer, modules, inputs, share=False)
    return stats


# --------------------------------------------------------------------------------------------------------
# Linear layers: nn.Linear and GPT-2's Conv1D (weight stored transposed, (in, out))
# --------------------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.weight.shape[0], module.weight.shape[1]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module's storage layout."""
    return module.weight.t() if is_conv1d(module) else module.weight
