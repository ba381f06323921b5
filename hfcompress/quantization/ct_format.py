"""The compressed-tensors ``quantization_config`` of a model quantized in memory.

:class:`~hfcompress.quantization.modules.CompressedLinear` already holds the checkpoint tensors under their
compressed-tensors names; this module writes the matching ``quantization_config`` (the ``config.json`` entry
that makes plain ``from_pretrained`` rebuild the layers) and decides which layers can be written at all.

Layout of the config (validated by compressed-tensors' own pydantic classes):

* ``format = "pack-quantized"``, ``quantization_status = "compressed"``;
* one config group per distinct weight scheme (bits, strategy, group size, symmetry). The scheme used by
  the most layers targets the class ``"Linear"``; each other one (e.g. layers that fell back to a smaller
  group size or per-channel) lists its layers by exact name, which compressed-tensors matches first. Those
  groups come before the ``"Linear"`` one, so that loading matches every target and warns about none;
* ``ignore`` lists, by exact name, every ``nn.Linear`` left in floating point (``lm_head``...).

Asymmetric zero points: compressed-tensors' compressor packs them along the output dimension into
``ceil(out * bits / 32)`` int32 rows, and its decompressor unpacks them from int32. But compressed-tensors
0.20.1, when transformers builds the empty model to load into, allocates them *unpacked* — (out, G) — so
transformers 5 rejects the packed tensor as a size mismatch (a checkpoint written by compressed-tensors'
own ``compress_model`` fails the same way). :func:`zero_point_rows` asks the installed compressed-tensors
which shape it allocates; when it is the unpacked one we write the packed words zero-padded to ``out``
rows (int32), which loads and decompresses exactly; otherwise the canonical packed shape.

All compressed-tensors coupling is here; it is tested against the installed version (0.20.x).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import primitives as P
from .modules import CompressedLinear

FORMAT = "pack-quantized"


@functools.lru_cache(maxsize=None)
def _loader_packs_zero_points() -> bool:
    """Whether the installed compressed-tensors allocates packed zero points when preparing a model to load."""
    try:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    except ImportError:
        return True
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=32))
    meta = {"weight": torch.empty(64, 64, device="meta"),
            "weight_scale": torch.empty(64, 2, device="meta"),
            "weight_zero_point": torch.empty(64, 2, dtype=torch.int8, device="meta")}
    try:
        allocated = PackedQuantizationCompressor.compress(meta, scheme)["weight_zero_point"]
    except Exception:
        return True
    return allocated.shape[0] != 64


def zero_point_rows(out_features: int, bits: int) -> int:
    """Rows of the int32 ``weight_zero_point`` tensor that the installed compressed-tensors loads."""
    return P.packed_length(out_features, bits) if _loader_packs_zero_points() else out_features


def unsupported_reason(module: CompressedLinear, source: nn.Module) -> str | None:
    """Why a quantized layer (replacing ``source``) cannot be saved in compressed-tensors format, if it cannot.

    ``source.source_class``, when present (a QAT ``FakeQuantLinear``), names the layer it was made from."""
    source_class = getattr(source, "source_class", type(source))
    if not issubclass(source_class, nn.Linear):
        return (f"it replaces a {source_class.__name__} layer (e.g. GPT-2's transposed Conv1D), which "
                f"compressed-tensors does not quantize, so transformers would load it unquantized; keep this "
                f"model in memory, or ignore these layers when quantizing")
    return None


def _scheme_key(module: CompressedLinear) -> tuple:
    return module.bits, module.group_size, module.symmetric


def weight_args(bits: int, group_size: int | None, symmetric: bool, actorder: bool = False):
    """compressed-tensors' ``QuantizationArgs`` of our integer weight scheme (group-wise, or per channel)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                            strategy="channel" if group_size is None else "group", group_size=group_size,
                            actorder="weight" if actorder and group_size is not None else None)


def module_weight_args(module: CompressedLinear):
    """The ``QuantizationArgs`` a checkpoint of ``module`` declares (what the packed runtime reads)."""
    return weight_args(*_scheme_key(module))


def quantization_config(model: nn.Module, actorder: bool = False) -> dict:
    """The ``quantization_config`` dict (config.json) describing the model's ``CompressedLinear`` layers."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    schemes: dict[tuple, list[str]] = {}
    ignore = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            schemes.setdefault(_scheme_key(module), []).append(name)
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    if not schemes:
        raise ValueError("the model has no CompressedLinear layers")
    ordered = sorted(schemes.items(), key=lambda item: -len(item[1]))  # most used scheme first
    groups = {}
    # The groups that name their layers come first and the class-wide "Linear" group last: compressed-tensors
    # gives each layer the most specific target that matches it whatever the order, but while loading it
    # marks, per layer, only the *first* target in config order that matches as used, and warns "Could not
    # match `<name>`" for every target never marked (utils/match.py, match_named_modules). With "Linear"
    # first, every named layer is claimed by "Linear" and each name warns once on every plain load.
    # config.json is written with sorted keys: the names must sort in this order too.
    width = len(str(len(ordered) - 1))
    for position, index in enumerate([*range(1, len(ordered)), 0]):
        (bits, group_size, symmetric), names = ordered[index]
        args = weight_args(bits, group_size, symmetric, actorder)
        targets = ["Linear"] if index == 0 else names
        groups[f"group_{position:0{width}d}"] = QuantizationScheme(targets=targets, weights=args, format=FORMAT)
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                ignore=ignore)
    data = config.model_dump()
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:  # pragma: no cover
        ct_version = None
    data.update({"quant_method": "compressed-tensors", "version": ct_version, "sparsity_config": {},
                 "transform_config": {}})
    return data
