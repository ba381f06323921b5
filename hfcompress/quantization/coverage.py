"""What a quantization covered: every linear weight is either quantized or listed with why it was not.

:func:`plan` runs before the model is changed and sorts its weights: the linears to quantize (``nn.Linear``
and GPT-2's ``Conv1D``), the ones the user's ``ignore`` keeps in float, and weights no method here can
quantize (fused 3-D MoE expert parameters, convolutions, any other non-Linear module with a weight matrix:
they count as linear weights left in float). Embeddings are listed too, but not counted as linear weights.
:func:`audit` runs after it and checks the claim against the modules actually in the model: a planned
target that is still a float linear is reported as left in floating point, never counted as quantized.

The one-line summary (:meth:`Coverage.line`, e.g. "14 of 15 linear weights quantized, 61.8% of parameters")
is what the report, ``config.json``'s ``hfcompress`` section and the model card state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .calibrate import is_linear, matches

EMBEDDING = "embedding (only linear layers are quantized)"


@dataclass
class Plan:
    """The model's weights, sorted before quantizing. Names are module names."""

    targets: dict[str, int]  # linear module -> weight elements
    skipped: dict[str, str]  # module (or parameter) -> why it is not quantized
    skipped_linear: set[str]  # those of ``skipped`` that count as linear weights
    ignored: set[str]  # skipped because the user asked (not an error under strict=True)
    total_parameters: int


@dataclass
class Coverage:
    """The outcome: ``quantized`` of ``linear_weights`` linear weights, and the parameters they hold."""

    quantized: list[str]
    linear_weights: int
    quantized_parameters: int
    total_parameters: int
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    left_float: list[str] = field(default_factory=list)  # meant to be quantized, still floating point
    verb: str = "quantized"

    @property
    def parameter_fraction(self) -> float:
        return self.quantized_parameters / max(self.total_parameters, 1)

    def line(self) -> str:
        return (f"{len(self.quantized)} of {self.linear_weights} linear weights {self.verb}, "
                f"{100 * self.parameter_fraction:.1f}% of parameters")

    def to_dict(self) -> dict:
        """Everything, the quantized names included (``model.hfcompress_report.coverage``)."""
        return {"line": self.line(), **asdict(self), "quantized_linear_weights": len(self.quantized),
                "parameter_fraction": self.parameter_fraction}

    def describe_skipped(self, limit: int = 8) -> str:
        """``name (reason)``, ..., for a card or an error."""
        items = [f"{name} ({reason})" for name, reason in self.skipped.items()]
        more = f", and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more


def stored(coverage: dict) -> dict:
    """What ``config.json``'s ``hfcompress.coverage`` keeps of :meth:`Coverage.to_dict`: the counts, the
    parameter share and the skipped weights with their reasons, not the name of every quantized layer (about
    70 KB on a 30-layer model, and the tensors say which layers are quantized: ``hfcompress verify`` derives
    that set from them)."""
    return {key: value for key, value in coverage.items() if key != "quantized"}


def _own_weights(module: nn.Module):
    """(name, parameter) of the module's own matrices (ndim >= 2), not its children's."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.ndim >= 2]


def plan(model: nn.Module, ignore: list[str], tied: dict[str, str] | None = None) -> Plan:
    """Sort ``model``'s weights (see the module docstring); ``ignore`` is ``QuantizationConfig.ignore``.

    A weight shared by two modules counts once, where it is first met. ``tied`` ({parameter name: name of the
    parameter it will share}, transformers' ``all_tied_weights_keys``) says so for a model whose ties are not
    made yet (the meta-device model ``from_pretrained`` builds before loading)."""
    tied = tied or {}
    aliases = {**{source: source for source in tied.values()}, **tied}

    def identity(full_name: str, param) -> int | str:
        return aliases.get(full_name, id(param))

    targets: dict[str, int] = {}
    skipped: dict[str, str] = {}
    skipped_linear: set[str] = set()
    ignored: set[str] = set()
    seen: set[int | str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        pattern = next((p for p in ignore if matches(name, p)), None)
        if is_linear(module):
            key = identity(f"{name}.weight", module.weight)
            if key in seen:
                continue  # a tied weight counts once
            seen.add(key)
            if pattern is not None:
                skipped[name] = f"ignored by the user ({pattern!r})"
                ignored.add(name)
                skipped_linear.add(name)
            else:
                targets[name] = module.weight.numel()
            continue
        for param_name, param in _own_weights(module):
            full = f"{name}.{param_name}"
            if identity(full, param) in seen:
                continue
            seen.add(identity(full, param))
            if isinstance(module, nn.Embedding) or "embed" in type(module).__name__.lower():
                skipped[full] = EMBEDDING
                continue
            skipped_linear.add(full)
            if pattern is not None:
                skipped[full] = f"ignored by the user ({pattern!r})"
                ignored.add(full)
            else:
                skipped[full] = (f"unsupported module type {type(module).__name__} (a {param.ndim}-D "
                                 f"{list(param.shape)} weight; only nn.Linear/Conv1D layers are quantized)")
    counted = {identity(n, p): p.numel() for n, p in model.named_parameters(remove_duplicate=False)}
    total = sum(counted.values())
    return Plan(targets, skipped, skipped_linear, ignored, total)


def audit(model: nn.Module, planned: Plan, is_quantized, verb: str = "quantized") -> Coverage:
    """Check ``planned`` against ``model`` after quantizing: ``is_quantized(module)`` says whether the module
    now at a target's name is a quantized one. Targets that are not are ``left_float``."""
    quantized, left = [], []
    for name in planned.targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        (quantized if module is not None and is_quantized(module) else left).append(name)
    skipped = dict(planned.skipped)
    for name in left:
        skipped[name] = "left in floating point (the method did not replace it)"
    return Coverage(quantized=quantized, linear_weights=len(planned.targets) + len(planned.skipped_linear),
                    quantized_parameters=sum(planned.targets[n] for n in quantized),
                    total_parameters=planned.total_parameters, skipped=skipped, left_float=left, verb=verb)


def not_covered(planned: Plan, coverage: Coverage) -> list[str]:
    """What ``strict=True`` refuses: targets left in float and weights of unsupported module types (anything
    that is neither quantized nor ignored by the user nor an embedding)."""
    unsupported = [n for n in planned.skipped_linear if n not in planned.ignored]
    return coverage.left_float + sorted(unsupported)
