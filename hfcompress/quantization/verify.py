"""``hfcompress verify DIR``: check a checkpoint folder against its own config.json without loading it.

Checks, in order:

1. files: config.json parses; ``model.safetensors`` or the index and every shard it lists exist; each
   safetensors header is intact and its tensors exactly fill the file (catches truncation and garbage);
   the index and the shards agree tensor by tensor.
2. layout: the model skeleton is built from config.json on the meta device and every tensor it needs is
   present with the right shape: for compressed-tensors ``pack-quantized`` modules ``weight_packed``
   (N, ceil(K*b/32)) int32, ``weight_scale`` (N, groups), ``weight_shape`` = [N, K], packed zero points for
   asymmetric schemes; for bitsandbytes 4-bit the packed bytes, ``absmax`` of ceil(N*K/blocksize) blocks and
   the quant_state; for LLM.int8 an int8 (N, K) weight and its ``SCB``; plain tensors match the skeleton.
   Tensors nobody expects are reported too.
3. values: scales finite and > 0 (bitsandbytes absmax >= 0); with ``deep=True`` every float tensor finite.
4. claims (:func:`check_claims`): what the model card (README.md) and config.json say about quantization
   matches the tensors: a folder that says it is quantized stores quantized weights, quantized weights come
   with a ``quantization_config``, and the layer count of the coverage line is the count stored.
0. integrity (first): every file listed in ``hfcompress-manifest.json`` present with its saved size and, with
   ``deep=True``, its saved SHA-256 (see :mod:`hfcompress.core.manifest`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    TensorInfo,
    TensorReader,
    check_zero_point,
    expected_ct_tensors,
    load_ct_config,
    module_schemes,
    num_groups,
    quant_method,
    read_config,
    read_index,
    weight_dims,
)

logger = logging.getLogger(__name__)

FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` found. ``ok`` is True when ``problems`` is empty."""

    path: str
    kind: str = "unknown"  # "compressed-tensors", "bitsandbytes", "plain", or another quant_method
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_files: int = 0
    num_tensors: int = 0
    tensors_checked: int = 0  # tensors whose shape/dtype was checked against the model
    values_checked: int = 0  # tensors whose values were read (scales; all floats with deep=True)
    quantized_modules: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self, max_problems: int = 20) -> str:
        status = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [f"{self.path}: {status}",
                 f"  format: {self.kind}; {self.num_files} weight files, {self.num_tensors} tensors, "
                 f"{self.quantized_modules} quantized modules",
                 f"  checked: {self.tensors_checked} tensors against config.json, {self.values_checked} tensors' values"]
        lines += [f"  problem: {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more problems")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_checkpoint(path: str | os.PathLike, deep: bool = True) -> VerifyReport:
    """Check a checkpoint folder (see the module docstring); never raises for a bad checkpoint — the
    problems are in the returned report (``report.ok``, ``report.problems``, ``report.summary()``)."""
    folder = Path(path).expanduser()
    report = VerifyReport(path=str(folder))
    if not folder.is_dir():
        report.problems.append(f"{str(folder)!r} is not a folder" if folder.exists()
                               else f"{str(folder)!r} does not exist")
        return report
    _check_file_integrity(folder, deep, report)
    try:
        config = read_config(folder)
        report.kind = quant_method(config) or "plain"
        infos = read_index(folder, problems=report.problems)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.num_files = len({info.file for info in infos.values()})
    report.num_tensors = len(infos)
    check_claims(folder, config, infos, report)

    model = _skeleton(folder, config, report)
    with TensorReader(infos) as reader:
        if model is not None:
            if report.kind == "compressed-tensors":
                expected = _expected_compressed_tensors(model, config, reader, report)
            elif report.kind == "bitsandbytes":
                expected = _expected_bitsandbytes(model, config, reader, report)
            elif report.kind == "plain":
                expected = {}
            else:
                expected = None
                report.notes.append(f"quant_method {report.kind!r}: only file and value checks were done")
            if expected is not None:
                _check_plain_and_unexpected(model, infos, expected, report)
        if deep:
            _check_float_values(infos, reader, report)
    return report


def _check_file_integrity(folder: Path, deep: bool, report: VerifyReport) -> None:
    """Sizes (and with ``deep`` SHA-256 hashes) against ``hfcompress-manifest.json``, when the folder has one."""
    from ..core.manifest import check_manifest

    integrity = check_manifest(folder, hashes=deep)
    report.problems += integrity.problems
    report.notes += integrity.notes


# ------------------------------------------------------------------------------------------------------
def _skeleton(folder: Path, config: dict, report: VerifyReport):
    """The model class from config.json on the meta device, or None (with a note) if it cannot be built."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(folder)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        architectures = getattr(hf_config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        with init_empty_weights():
            if cls is not None:
                return cls._from_config(hf_config)
            return transformers.AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # any failure here only limits how much we can check
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.notes.append(f"could not build the model from config.json ({first}); tensor layout not checked")
        return None


def _expected_compressed_tensors(model, config: dict, reader: TensorReader, report: VerifyReport) -> dict:
    """Check every pack-quantized module; return {tensor name: handled} for the names it accounted for."""
    try:
        qconfig = load_ct_config(config["quantization_config"])
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return {}
    accounted: dict[str, bool] = {}
    for name, scheme in module_schemes(model, qconfig).items():
        module = model.get_submodule(name)
        weights = scheme.weights
        fmt = scheme.format or qconfig.format
        report.quantized_modules += 1
        if weights is None or fmt != "pack-quantized" or weights.type != "int":
            # Other compressed-tensors formats (fp8, naive int8, nvfp4, ...): presence of the scale only.
            accounted.update({t: True for t in reader.infos
                              if t.startswith(name + ".") and t.count(".") == name.count(".") + 1})
            if weights is not None and f"{name}.weight_scale" not in reader.infos:
                report.problems.append(f"checkpoint is missing tensor {name + '.weight_scale'!r}")
            note = f"compressed-tensors format {fmt!r}: only the presence of scales was checked"
            if note not in report.notes:
                report.notes.append(note)
            continue
        n, k = weight_dims(module)
        for tensor, (shape, dtypes) in expected_ct_tensors(name, module, weights).items():
            accounted[tensor] = True
            info = reader.infos.get(tensor)
            if info is None:
                report.problems.append(f"checkpoint is missing tensor {tensor!r} ({weights.num_bits}-bit "
                                       f"{weights.strategy} scheme in config.json)")
                continue
            report.tensors_checked += 1
            if tensor.endswith("weight_zero_point"):
                problem = check_zero_point(info, n, num_groups(k, weights), weights.num_bits)
            elif info.dtype not in dtypes:
                problem = (f"tensor {tensor!r} in {info.file.name} has dtype {info.dtype}, expected "
                           f"{'/'.join(sorted(dtypes))}")
            elif info.shape != shape and not (tensor.endswith("weight_scale") and weights.strategy == "tensor"
                                              and math.prod(info.shape) == 1):
                problem = (f"tensor {tensor!r} in {info.file.name} has shape {list(info.shape)}, expected "
                           f"{list(shape)} for a {weights.num_bits}-bit {weights.strategy} weight of ({n}, {k})")
            else:
                problem = None
            if problem:
                report.problems.append(problem)
                continue
            if tensor.endswith("weight_shape"):
                stored = _read(reader, tensor, report)
                if stored is not None and stored.tolist() != [n, k]:
                    report.problems.append(f"tensor {tensor!r} says {stored.tolist()}, but config.json's model "
                                           f"has a ({n}, {k}) weight")
            elif tensor.endswith("weight_scale"):
                _check_scale(reader, info, report, allow_zero=False)
            elif tensor.endswith("weight_zero_point") and info.dtype == "I32" and info.shape[0] == n:
                words = math.ceil(n * weights.num_bits / 32)
                stored = _read(reader, tensor, report)
                if words < n and stored is not None and stored[words:].any():
                    report.problems.append(f"tensor {tensor!r} in {info.file.name}: rows {words}..{n - 1} should be "
                                           "zero padding after the packed zero points")
        for optional in ("bias", "weight_g_idx"):
            accounted[f"{name}.{optional}"] = True
    return accounted


def _bnb_quant_state(reader: TensorReader, info: TensorInfo, report: VerifyReport) -> dict | None:
    """bitsandbytes stores the non-tensor quant_state (shape, blocksize, dtype...) as JSON bytes in a uint8
    tensor (``bitsandbytes.utils.pack_dict_to_tensor``); decoded here without importing bitsandbytes."""
    import json

    tensor = _read(reader, info.name, report)
    if tensor is None:
        return None
    try:
        state = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (UnicodeDecodeError, ValueError) as exc:
        report.problems.append(f"tensor {info.name!r} in {info.file.name} is not a readable bitsandbytes "
                               f"quant_state ({type(exc).__name__})")
        return None


def _expected_bitsandbytes(model, config: dict, reader: TensorReader, report: VerifyReport) -> dict:
    qc = config["quantization_config"]
    four_bit = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    infos = reader.infos
    accounted: dict[str, bool] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
            continue
        weight = f"{name}.weight"
        if weight not in infos or infos[weight].dtype in FLOAT_TAGS:
            continue  # kept in float (skipped modules, the output head): checked as a plain tensor
        n, k = (module.weight.shape if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1])
        report.quantized_modules += 1
        accounted[weight] = True
        report.tensors_checked += 1
        if four_bit:
            state_keys = [t for t in infos if t.startswith(weight + ".quant_state.bitsandbytes__")]
            names = [weight + s for s in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")]
            accounted.update({t: True for t in state_keys + names})
            if len(state_keys) != 1:
                report.problems.append(f"4-bit weight {weight!r} has no quant_state.bitsandbytes__nf4/fp4 tensor")
                continue
            state = _bnb_quant_state(reader, infos[state_keys[0]], report)
            if state is None:
                continue
            if list(state.get("shape", [])) != [n, k]:
                report.problems.append(f"{state_keys[0]!r} records shape {state.get('shape')}, but config.json's "
                                       f"model has a ({n}, {k}) weight")
            expected_bytes = math.ceil(n * k / 2)
            stored = infos[weight]
            if math.prod(stored.shape) * _itemsize(stored) != expected_bytes:
                report.problems.append(f"4-bit weight {weight!r} holds {math.prod(stored.shape) * _itemsize(stored)}"
                                       f" bytes, expected {expected_bytes} for ({n}, {k})")
            blocks = math.ceil(n * k / int(state.get("blocksize", 64)))
            absmax = infos.get(weight + ".absmax")
            if absmax is None or math.prod(absmax.shape) != blocks:
                report.problems.append(f"tensor {weight + '.absmax'!r} should hold {blocks} block scales "
                                       f"(blocksize {state.get('blocksize')}), found "
                                       f"{None if absmax is None else list(absmax.shape)}")
            elif absmax.dtype in FLOAT_TAGS:
                _check_scale(reader, absmax, report, allow_zero=True)
            nested = "nested_blocksize" in state
            if nested and weight + ".nested_absmax" not in infos:
                report.problems.append(f"double-quantized {weight!r} is missing {weight + '.nested_absmax'!r}")
            elif nested:
                _check_scale(reader, infos[weight + ".nested_absmax"], report, allow_zero=True)
            if weight + ".quant_map" not in infos:
                report.problems.append(f"4-bit weight {weight!r} is missing {weight + '.quant_map'!r}")
        else:
            stored = infos[weight]
            accounted[f"{name}.SCB"] = accounted[f"{name}.weight_format"] = True
            if stored.dtype != "I8" or stored.shape != (n, k):
                report.problems.append(f"int8 weight {weight!r} is {stored.dtype} {list(stored.shape)}, expected "
                                       f"I8 [{n}, {k}]")
            scb = infos.get(f"{name}.SCB")
            if scb is None or scb.shape != (n,):
                report.problems.append(f"int8 weight {weight!r} needs {name + '.SCB'!r} of shape [{n}], found "
                                       f"{None if scb is None else list(scb.shape)}")
            else:
                _check_scale(reader, scb, report, allow_zero=True)
    return accounted


def _check_plain_and_unexpected(model, infos: dict[str, TensorInfo], accounted: dict, report: VerifyReport) -> None:
    """Every non-quantized parameter/persistent buffer of the skeleton is stored with its shape; nothing
    else is stored."""
    non_persistent = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    expected.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in non_persistent})
    quantized_modules = {t.rsplit(".", 1)[0] for t in accounted}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    plain = {}
    for name, tensor in expected.items():
        module_name = name.rsplit(".", 1)[0]
        if name in accounted or module_name in quantized_modules:
            continue  # a quantized module's float weight is replaced by its packed tensors
        if name not in infos:
            partner = tied.get(name) or next((t for t, s in tied.items() if s == name), None)
            partner_module = partner.rsplit(".", 1)[0] if partner else None
            if partner and (partner in infos or partner_module in quantized_modules):
                continue  # stored once under its tied name
        plain[name] = tensor
    stored = _stored_layout(model, plain, report)
    for name, tensor in stored.items():
        info = infos.get(name)
        if info is None:
            report.problems.append(f"checkpoint is missing tensor {name!r} {list(tensor.shape)}")
            continue
        report.tensors_checked += 1
        if tuple(info.shape) != tuple(tensor.shape):
            report.problems.append(f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, but "
                                   f"config.json's model expects {list(tensor.shape)}")
    for name, info in infos.items():
        if name not in stored and name not in expected and name not in accounted:
            report.problems.append(f"tensor {name!r} in {info.file.name} does not belong to the model that "
                                   "config.json describes")


def _stored_layout(model, tensors: dict, report: VerifyReport) -> dict:
    """``tensors`` (the skeleton's names, meta tensors) under the names and shapes ``save_pretrained`` writes.

    transformers 5 converts some checkpoints' layout at load and back at save (Mixtral's per-expert
    ``block_sparse_moe.experts.N.w1`` <-> the fused ``mlp.experts.gate_up_proj``), so the file holds the
    reverted layout; its own ``revert_weight_conversion`` gives it (shape-only work on meta tensors).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(model, dict(tensors)))
    except Exception as exc:  # an unknown conversion only limits the check to the in-memory names
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.notes.append(f"could not map the model's tensors to the saved layout ({first}); checked the "
                            "in-memory names")
        return tensors


def _check_float_values(infos: dict[str, TensorInfo], reader: TensorReader, report: VerifyReport) -> None:
    for name, info in infos.items():
        if info.dtype not in FLOAT_TAGS or name.endswith(("weight_scale", ".absmax", ".SCB", "nested_absmax")):
            continue  # scales were already read
        tensor = _read(reader, name, report)
        if tensor is None:
            continue
        report.values_checked += 1
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            report.problems.append(f"tensor {name!r} in {info.file.name} has {bad} non-finite values")


def _check_scale(reader: TensorReader, info: TensorInfo, report: VerifyReport, allow_zero: bool) -> None:
    scale = _read(reader, info.name, report)
    if scale is None:
        return
    report.values_checked += 1
    scale = scale.float()
    if not torch.isfinite(scale).all():
        report.problems.append(f"scale tensor {info.name!r} in {info.file.name} has "
                               f"{int((~torch.isfinite(scale)).sum())} non-finite values")
    elif (scale < 0).any() or (not allow_zero and (scale == 0).any()):
        bad = int((scale < 0).sum() if allow_zero else (scale <= 0).sum())
        report.problems.append(f"scale tensor {info.name!r} in {info.file.name} has {bad} values "
                               f"{'< 0' if allow_zero else '<= 0'}")


def _read(reader: TensorReader, name: str, report: VerifyReport) -> torch.Tensor | None:
    try:
        return reader.get(name)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return None


def _itemsize(info: TensorInfo) -> int:
    from .checkpoint import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES[info.dtype][0]


# ------------------------------------------------------------------------------------------------------
# Claims: what the card and config.json say against what the tensors are
# ------------------------------------------------------------------------------------------------------
_COVERAGE_LINE = r"\*\*Coverage:\*\* (\d+) of (\d+) linear weights quantized"


def stored_quantized_modules(infos: dict[str, TensorInfo]) -> list[str]:
    """Modules whose weight is stored quantized: a compressed-tensors ``weight_packed``, or a ``weight`` of a
    non-float dtype (bitsandbytes' packed uint8 / int8, compressed-tensors' int8 or fp8)."""
    names = set()
    for name, info in infos.items():
        if name.endswith(".weight_packed"):
            names.add(name.removesuffix(".weight_packed"))
        elif name.endswith(".weight") and info.dtype not in FLOAT_TAGS:
            names.add(name.removesuffix(".weight"))
    return sorted(names)


def card_claims(folder: Path) -> dict:
    """What README.md says: ``{"quantized": bool, "why": str, "count": int | None}`` (count from the
    "**Coverage:** N of M linear weights quantized" line hfcompress writes); empty without a card."""
    import re

    import yaml

    path = folder / "README.md"
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    tags = []
    if text.startswith("---"):
        front, _, _ = text[3:].partition("\n---")
        try:
            meta = yaml.safe_load(front) or {}
            tags = [str(t) for t in (meta.get("tags") or [])] if isinstance(meta, dict) else []
        except yaml.YAMLError:
            tags = []
    coverage = re.search(_COVERAGE_LINE, text)
    count = int(coverage.group(1)) if coverage else None
    if coverage and count > 0:
        return {"quantized": True, "why": f"its coverage line says {coverage.group(0).split('** ', 1)[1]}",
                "count": count}
    if "quantized" in tags:
        return {"quantized": True, "why": "it is tagged 'quantized'", "count": count}
    return {"quantized": False, "why": "", "count": count}


def _check_coverage(coverage: dict, stored: list[str], report: VerifyReport) -> None:
    """config.json's ``hfcompress.coverage`` against the quantized modules the tensors hold: the count of
    quantized linear weights, and no weight said to be kept in float stored quantized. Checkpoints written
    before the count was stored list every quantized name instead (``quantized``): that list must be the set."""
    if not stored or not isinstance(coverage, dict):
        return
    claimed = coverage.get("quantized")
    if isinstance(claimed, list) and set(claimed) != set(stored):
        missing = sorted(set(claimed) - set(stored))
        extra = sorted(set(stored) - set(claimed))
        detail = "; ".join(part for part in (
            f"said quantized but stored in float: {', '.join(missing[:5])}" if missing else "",
            f"stored quantized but not listed: {', '.join(extra[:5])}" if extra else "") if part)
        report.problems.append(f"config.json's hfcompress.coverage lists {len(claimed)} quantized linear weights, "
                               f"the checkpoint stores {len(stored)} ({detail})")
    count = coverage.get("quantized_linear_weights")
    if isinstance(count, int) and count != len(stored):
        report.problems.append(f"config.json's hfcompress.coverage says {count} linear weights are quantized, the "
                               f"checkpoint stores {len(stored)} quantized weights")
    skipped = coverage.get("skipped")
    quantized = set(stored)
    wrong = sorted(name for name in (skipped if isinstance(skipped, dict) else {})
                   if name in quantized or name.removesuffix(".weight") in quantized)
    if wrong:
        report.problems.append(f"config.json's hfcompress.coverage says {', '.join(wrong[:5])} "
                               f"{'is' if len(wrong) == 1 else 'are'} kept in floating point "
                               f"({skipped[wrong[0]]}), but the checkpoint stores {'it' if len(wrong) == 1 else 'them'}"
                               " quantized")


def check_claims(folder: Path, config: dict, infos: dict[str, TensorInfo], report: VerifyReport) -> None:
    """Append a problem for every way the card or config.json misstates the tensors (see the module docstring)."""
    stored = stored_quantized_modules(infos)
    floats = sorted({info.dtype for n, info in infos.items() if n.endswith(".weight") and info.dtype in FLOAT_TAGS})
    qconfig = config.get("quantization_config")
    card = card_claims(folder)
    if card.get("quantized") and not stored:
        report.problems.append(f"README.md says the model is quantized ({card['why']}), but no weight in the "
                               f"checkpoint is: every weight tensor is floating point ({'/'.join(floats) or '-'})")
    if qconfig and not stored:
        report.problems.append(f"config.json has a quantization_config (quant_method "
                               f"{qconfig.get('quant_method')!r}), but no weight in the checkpoint is quantized: every "
                               f"weight tensor is floating point ({'/'.join(floats) or '-'})")
    if stored and not qconfig:
        example = next(n for n in infos if n.startswith(stored[0] + ".weight"))
        report.problems.append(f"{len(stored)} weight(s) are stored quantized (e.g. {example!r}, "
                               f"{infos[example].dtype}) but config.json has no quantization_config, so "
                               f"transformers would not load them as quantized")
    _check_coverage(((config.get("hfcompress") or {}).get("coverage") or {}), stored, report)
    if card.get("count") is not None and stored and card["count"] != len(stored):
        report.problems.append(f"README.md says {card['count']} linear weights are quantized, the checkpoint "
                               f"stores {len(stored)} quantized weights")
