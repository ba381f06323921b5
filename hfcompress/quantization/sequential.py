"""One forward pass per decoder layer: every linear is quantized when the calibration batches reach it.

GPTQ needs the Hessian of a linear's inputs over *all* calibration batches before it can quantize that linear,
and in GPTQ's "true sequential" order those inputs come from the already-quantized linears before it in the
layer (o_proj sees the attention of quantized q/k/v, down_proj the activations of quantized gate/up). Doing
that with ordinary forward passes costs one pass per group of linears, or — quantizing the whole layer from
its floating-point pass, as llm-compressor does — two passes per layer (statistics, then the quantized
layer's outputs for the next one).

Here every calibration batch runs through the layer once, each in its own greenlet (a coroutine with its own
stack, on the calling thread: torch's thread-local state — no_grad, autocast, the thread pool — is shared).
A pre-hook on each linear still to quantize parks the batch there. When every running batch is parked, the
first parked linear (in module order) gets its statistics from the inputs the batches hold, is quantized,
its weight replaced in place by the dequantized result, and those batches resume. The layer's outputs,
computed with all of its linears quantized, are the next layer's inputs: nothing is run twice.

Cost: all of a layer's calibration batches are in flight at once, so the activations alive inside the layer
at a parking point (e.g. the MLP's intermediate activations before ``down_proj``) are held for every batch.
``QuantizationConfig(true_sequential=False)`` uses the two-pass scheme, which holds only the layer inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from greenlet import GreenletExit, getcurrent, greenlet
from torch import nn

from . import calibrate as C

logger = logging.getLogger(__name__)


IN_FLIGHT_FACTOR = 6.0  # see in_flight_bytes
MEMORY_FRACTION = 0.5  # of the free memory the one-pass scheme may plan to use


def in_flight_bytes(inputs: C.LayerInputs, targets: dict[str, nn.Module]) -> int:
    """An estimate of the memory the one-pass scheme holds on top of the layer inputs: every batch's live
    activations at a parking point. Measured on Llama (SDPA attention): at ``o_proj`` a batch holds about five
    hidden-sized tensors (the normalized input, q, k, v, the attention output), at ``down_proj`` the
    intermediate activation plus two hidden-sized ones; ``4 + 2 * widest input / hidden size`` times the
    hidden states bounds both with the temporaries of the batch that is running."""
    hidden = [C.hidden_states(inputs, i) for i in range(len(inputs))]
    width = max((h.shape[-1] for h in hidden if h.ndim), default=1)
    widest = max((C.linear_shape(module)[1] for module in targets.values()), default=width)
    total = sum(h.numel() * h.element_size() for h in hidden)
    return int(total * (IN_FLIGHT_FACTOR + 2 * max(1.0, widest / width)))


def free_bytes(device: torch.device) -> int:
    """Free memory where the calibration activations live: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def fits_in_memory(inputs: C.LayerInputs, targets: dict[str, nn.Module]) -> bool:
    """Whether the one-pass scheme's estimated in-flight activations fit in :data:`MEMORY_FRACTION` of the
    free memory; if not, warns that GPTQ falls back to two passes per layer."""
    if not len(inputs):
        return True
    device = C.hidden_states(inputs, 0).device
    need, free = in_flight_bytes(inputs, targets), free_bytes(device)
    if need <= MEMORY_FRACTION * free:
        return True
    gib = 2 ** 30
    logger.warning("GPTQ true_sequential: one pass per layer would hold ~%.1f GiB of calibration activations "
                   "(%d batches in flight), more than %d%% of the %.1f GiB free on %s; running two passes per "
                   "layer instead (every linear from the layer's floating-point pass). Lower num_samples or "
                   "seq_len to keep the one-pass order, or set true_sequential=False to silence this",
                   need / gib, len(inputs), math.floor(MEMORY_FRACTION * 100), free / gib, device)
    return False


@dataclass
class SharingPlan:
    """Which linears read the very same input tensor as an earlier one (q/k/v, gate/up), by layer class and
    name relative to the layer: learned on the first layer of a class, then used to quantize such linears
    together (one stacked GPTQ sweep) on the later ones. A later layer that contradicts the plan drops it."""

    followers: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (class, leader) -> followers
    learned: set[str] = field(default_factory=set)  # layer classes seen

    def group(self, layer: nn.Module, leader: str) -> list[str]:
        return self.followers.get((type(layer).__name__, leader), [])


@dataclass
class _Park:
    """A batch stopped before ``name`` ran on ``x``."""

    name: str
    x: torch.Tensor


@torch.no_grad()
def quantize_layer_in_one_pass(
    layer: nn.Module,
    inputs: C.LayerInputs,
    targets: dict[str, nn.Module],
    quantize_group: Callable[[list[str], C.InputStats], None],
    plan: SharingPlan | None = None,
    layer_name: str = "",
    propagate: bool = True,
) -> list[str]:
    """Run ``layer`` once on its calibration batches, calling ``quantize_group(names, stats)`` for each group
    of ``targets`` (full names -> linears inside ``layer``) as soon as the batches reach it; the callback must
    replace those linears' weights by their quantized values before returning. With ``propagate``, each
    batch's hidden states in ``inputs`` are replaced by the layer's output (the next layer's input); without
    it the batches stop once every target is quantized. Returns the targets that no batch ever called."""
    scheduler = getcurrent()
    names = {id(module): name for name, module in targets.items()}
    order = {name: i for i, name in enumerate(targets)}
    prefix = layer_name + "." if layer_name else ""
    done: set[str] = set()
    leader_of: dict[str, str] = {}  # follower -> leader, for linears quantized with a leader in this layer
    leader_input: dict[int, dict[str, torch.Tensor]] = {}  # batch -> leader -> what it read
    stats_of: dict[str, C.InputStats] = {}
    contradicted = False

    def hook(module, args):
        nonlocal contradicted
        me = getcurrent()
        if getattr(me, "batch", None) is None or me.parent is not scheduler or not args:
            return None  # not one of this pass's batches (e.g. the scheduler itself)
        name = names[id(module)]
        if name in done:
            leader = leader_of.get(name)
            if leader is not None and leader_input.get(me.batch, {}).get(leader) is not args[0]:
                contradicted = True
            return None
        me.parent.switch(_Park(name, args[0]))
        return None

    def forward(i: int):
        args, kwargs = inputs.args[i], inputs.kwargs[i]
        return layer(*args, **kwargs)

    handles = [module.register_forward_pre_hook(hook) for module in targets.values()]
    runners: list[greenlet] = []
    parked: dict[int, _Park] = {}
    last: dict[int, tuple[torch.Tensor, C.InputStats, frozenset]] = {}  # batch -> previous parking point

    def advance(i: int) -> None:
        message = runners[i].switch()
        if runners[i].dead:
            last.pop(i, None)
            leader_input.pop(i, None)
            if propagate:
                C.set_layer_output(inputs, i, message)
        else:
            parked[i] = message

    try:
        for i in range(len(inputs)):
            runner = greenlet(lambda i=i: forward(i), parent=scheduler)
            runner.batch = i
            runners.append(runner)
        for i in range(len(runners)):
            advance(i)
        while parked:
            name = min({p.name for p in parked.values()}, key=order.__getitem__)
            batches = frozenset(i for i, p in parked.items() if p.name == name)
            stats = _shared_stats(batches, parked, last)
            if stats is None:
                module = targets[name]
                width = C.linear_shape(module)[1]
                device = next(module.parameters()).device
                stats = C.InputStats(torch.zeros(width, width, device=device), None)  # GPTQ: no E|x|
                for i in sorted(batches):
                    stats.add(parked[i].x.detach())
            relative = name[len(prefix):]
            followers = [prefix + f for f in (plan.group(layer, relative) if plan else [])
                         if prefix + f in targets and prefix + f not in done]
            group = [name] + followers
            quantize_group(group, stats)
            done.update(group)
            stats_of.update(dict.fromkeys(group, stats))
            for follower in followers:
                leader_of[follower] = name
            for i in batches:
                last[i] = (parked[i].x, stats, batches)
                if followers:
                    leader_input.setdefault(i, {})[name] = parked[i].x
                del parked[i]
            if not propagate and len(done) == len(targets):
                break  # nothing after the last target is needed
            for i in sorted(batches):
                advance(i)
    finally:
        for handle in handles:
            handle.remove()
        for runner in runners:
            if not runner.dead:
                runner.throw(GreenletExit)  # unwind the batches left parked (an error, or propagate=False)
    if plan is not None:
        kind = type(layer).__name__
        if contradicted:
            logger.warning("%s: linears quantized together did not read the same input on every batch; "
                           "quantizing each linear on its own from now on", layer_name or kind)
            plan.followers.clear()
        elif kind not in plan.learned:
            for group in _shared_groups(stats_of, order):
                plan.followers[(kind, group[0][len(prefix):])] = [n[len(prefix):] for n in group[1:]]
        plan.learned.add(kind)
    return [name for name in targets if name not in done]


def _shared_stats(batches: frozenset, parked: dict[int, _Park], last: dict) -> C.InputStats | None:
    """The statistics of the previous parking point if every one of ``batches`` parked there, with this very
    input tensor (the linear reads what the previous one read: q/k/v, gate/up); else None."""
    shared = None
    for i in batches:
        previous = last.get(i)
        if previous is None or previous[0] is not parked[i].x or previous[2] != batches:
            return None
        if shared is not None and previous[1] is not shared:
            return None
        shared = previous[1]
    return shared


def _shared_groups(stats_of: dict[str, C.InputStats], order: dict[str, int]) -> list[list[str]]:
    """Names that were given one statistics object, in module order, for each object shared by several."""
    groups: dict[int, list[str]] = {}
    for name in sorted(stats_of, key=order.__getitem__):
        groups.setdefault(id(stats_of[name]), []).append(name)
    return [group for group in groups.values() if len(group) > 1]
