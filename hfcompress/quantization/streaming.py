"""``quantize_checkpoint(src, out_dir, config)``: quantize a safetensors checkpoint larger than memory.

The model is never materialised whole. Its skeleton is built from ``config.json`` on the ``meta`` device
(accelerate's ``init_empty_weights``; buffers such as rotary tables stay real), then, one unit at a time:

1. tensors outside the decoder layers that stay in floating point (embeddings, final norm, an ignored
   ``lm_head``) are copied from the source shards, one tensor at a time;
2. with calibration data, the modules in front of the first decoder layer (the embeddings) are read, the
   calibration tokens are run up to the first layer (:func:`.calibrate.capture_first_layer_inputs`, which
   also records the causal mask and rotary embeddings the model builds), and freed again;
3. each decoder layer is read from the shards (``safe_open``), quantized on the cached inputs by the very
   steps of the in-memory path (:class:`.api.LayerwiseQuantizer`: the same statistics, GPTQ/AWQ/RTN solvers,
   true-sequential one-pass GPTQ and packing), run to produce the next layer's inputs from the *quantized*
   layer, written to its own part file and put back on ``meta``;
4. linears outside the decoder layers that are quantized (``lm_head`` when not ignored) are rounded to
   nearest, as the in-memory path does.

At the end the parts are concatenated (byte copies, no decoding) into ``model-0000i-of-0000n.safetensors``
shards of at most ``max_shard_size`` with ``model.safetensors.index.json``; ``config.json`` gets the same
``quantization_config`` and ``hfcompress`` blocks as :func:`hfcompress.quantize` + ``save_pretrained``, the
folder is verified, hashed into its manifest and renamed into place (:func:`hfcompress.core.atomic.publish`).
For RTN the tensors are bit-identical to the in-memory path's; GPTQ/AWQ run the same arithmetic on the same
inputs (the layer's calibration inputs come from the already-quantized previous layers in both).

Memory. Peak RSS is bounded by :class:`MemoryBound`: what the process held before starting, plus two copies
of the largest unit (the layer read from the shards and, while it runs, its dequantized/quantized copy),
the calibration hidden states and the per-layer work (Hessians, one batch's activations, GPTQ's in-flight
batches). The bound is logged before starting and shown with the current RSS in the progress bar; a
``max_memory`` below it is refused before anything is read. When the calibration hidden states do not fit in
the budget they stay on disk (one file per batch, read and written one batch at a time) and GPTQ uses two
passes per layer instead of one.

Resuming. Everything is written into ``.<out_dir name>.partial`` beside ``out_dir``, with a state file that
records the finished units, their reports, the random generator's state and where the next layer's inputs
are saved. A rerun with the same source, config and calibration data continues after the last finished
unit; other settings are refused (:class:`ResumeMismatchError`). A disk that fills up removes the partial
output and says how much space the output needs (:class:`DiskFullError`).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.atomic import check_destination, locked_output, publish
from ..core.devices import peak_rss_bytes
from ..core.errors import ConfigError, DataError, HFCompressError
from . import api as A
from . import calibrate as C
from . import coverage as CV
from . import ct_format
from . import primitives as P
from . import sequential as S
from .awq import AWQ_SEARCH_SAMPLES
from .checkpoint import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    CheckpointError,
    TensorInfo,
    TensorReader,
    read_index,
    resolve_checkpoint,
)
from .config import INT_METHODS, QuantizationConfig
from .modules import CompressedLinear
from .rollback import Rollback

logger = logging.getLogger(__name__)

STATE_FILE = "stream-state.json"
STATE_FORMAT = "hfcompress-stream/1"
PARTIAL_SUFFIX = ".partial"
WORK_DIR = ".stream"  # inside the staging folder: parts, inputs cache, state (hidden: not in the manifest)
GIB = 2 ** 30


class MemoryBudgetError(HFCompressError):
    """``max_memory`` cannot hold what quantizing one decoder layer needs, or was exceeded while running."""


class DiskFullError(HFCompressError):
    """The disk filled up while writing the quantized checkpoint (the partial output was removed)."""


class ResumeMismatchError(HFCompressError):
    """A partial output exists from a run with another source, config or calibration data."""


# --------------------------------------------------------------------------------------------------------
# Memory: measuring and bounding
# --------------------------------------------------------------------------------------------------------
def parse_memory(value) -> int | None:
    """``"8GB"``, ``"500MB"`` (decimal, as ``max_shard_size``), ``"8GiB"`` or bytes -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value <= 0):
        raise ConfigError(f"max_memory={value!r} is not a size; write it like '8GB' or '8GiB'")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    binary = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    decimal = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    for unit, factor in {**binary, **decimal}.items():
        if text.endswith(unit):
            try:
                number = float(text[:-len(unit)])
            except ValueError:
                break
            if number > 0:
                return int(number * factor)
            break
    else:
        if text.isdigit() and int(text) > 0:
            return int(text)
    raise ConfigError(f"max_memory={value!r} is not a size; write it like '8GB' or '8GiB'")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and the RSS
    would count every layer ever read)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass
class MemoryBound:
    """What the peak RSS is bounded by (bytes); :attr:`total` is the bound."""

    baseline: int  # RSS before starting: interpreter, torch, transformers, the skeleton
    unit: int  # the largest unit read at once: a decoder layer (or the modules before the first one)
    cache: int  # calibration hidden states held in memory (0 when they are kept on disk: one batch)
    work: int  # per-layer temporaries: Hessians and their GPTQ copies, one batch's activations
    in_flight: int = 0  # one-pass GPTQ: every batch's activations inside the layer at once

    @property
    def total(self) -> int:
        return self.baseline + 2 * self.unit + self.cache + self.work + self.in_flight

    def describe(self) -> str:
        extra = f" + {_gib(self.in_flight)} GPTQ batches in flight" if self.in_flight else ""
        return (f"{_gib(self.total)} = {_gib(self.baseline)} baseline + 2 x {_gib(self.unit)} largest layer + "
                f"{_gib(self.cache)} calibration cache + {_gib(self.work)} per-layer work{extra}")


# --------------------------------------------------------------------------------------------------------
# The source: skeleton on meta, tensors by name
# --------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    folder: Path
    infos: dict[str, TensorInfo]

    def nbytes(self, name: str) -> int:
        info = self.infos[name]
        numel = 1
        for d in info.shape:
            numel *= d
        return numel * info.torch_dtype.itemsize

    def fingerprint(self) -> dict:
        """What identifies the source: config.json's hash and every shard's size and mtime."""
        files = sorted({info.file for info in self.infos.values()})
        return {"folder": str(self.folder.resolve()),
                "config_sha256": hashlib.sha256((self.folder / "config.json").read_bytes()).hexdigest(),
                "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def build_skeleton(folder: Path, infos: dict[str, TensorInfo]) -> nn.Module:
    """The causal LM of ``folder/config.json`` with every parameter on ``meta`` (buffers real), in the dtype
    its weights are stored in (what ``from_pretrained(dtype="auto")`` would give)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the model config of {str(folder)!r}: "
                              f"{str(exc).strip().splitlines()[0]}") from exc
    floats = [info.torch_dtype for info in infos.values() if info.torch_dtype.is_floating_point]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{str(folder)!r}: cannot build a causal LM from its config.json: "
                              f"{str(exc).strip().splitlines()[0]}") from exc
    model.tie_weights()  # init_empty_weights makes a separate meta parameter of each tied weight
    return model.eval()


def _state_names(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers of ``module`` (what its state dict holds), relative names."""
    return list(module.state_dict(keep_vars=True).keys())


def checkpoint_names(model: nn.Module, source: Source) -> dict[str, str | None]:
    """Every state-dict key of ``model`` -> the checkpoint tensor that holds it, or None for a tied weight the
    checkpoint stores once under another key (``lm_head.weight`` tied to the embeddings). A key missing from
    the checkpoint raises, naming it."""
    state = model.state_dict(keep_vars=True)
    first_key: dict[int, str] = {}
    names: dict[str, str | None] = {}
    for key, tensor in state.items():
        if key in source.infos:
            names[key] = key
            first_key.setdefault(id(tensor), key)
    for key, tensor in state.items():
        if key in names:
            continue
        if id(tensor) in first_key:
            names[key] = None
            continue
        raise CheckpointError(f"{source.folder}: the checkpoint has no tensor {key!r}, which "
                              f"{type(model).__name__} needs (not in {SAFE_INDEX} / {SAFE_WEIGHTS}); check that the "
                              f"shards and config.json belong to the same model")
    return names


def load_module(module: nn.Module, prefix: str, source: Source, names: dict[str, str | None]) -> None:
    """Read ``module``'s parameters and persistent buffers from the shards (``safe_open``, closed again so
    that no mapped page stays resident) and put them in place of the meta tensors, in the skeleton's dtype
    (as ``from_pretrained`` casts them)."""
    current = module.state_dict(keep_vars=True)
    state = {}
    with TensorReader(source.infos) as reader:
        for k, meta in current.items():
            if names.get(prefix + k):
                tensor = reader.get(names[prefix + k])
                if tensor.is_floating_point() and meta.is_floating_point() and tensor.dtype != meta.dtype:
                    tensor = tensor.to(meta.dtype)
                state[k] = tensor
    try:
        module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source.folder}: tensors of {prefix.rstrip('.') or 'the model'} do not match "
                              f"config.json: {str(exc).strip().splitlines()[-1].strip()}") from exc
    for param in module.parameters():
        param.requires_grad_(False)


def unload_module(module: nn.Module) -> None:
    """Put ``module``'s tensors back on ``meta`` (frees them)."""
    module.to("meta")


# --------------------------------------------------------------------------------------------------------
# Output: one part file per unit, concatenated into shards at the end
# --------------------------------------------------------------------------------------------------------
def write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one unit's tensors as a safetensors file (complete or absent: written beside, then renamed)."""
    from safetensors.torch import save_file

    staged = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(staged), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as exc:  # safetensors reports I/O errors as SafetensorError: keep "disk full" recognisable
        if "No space left" in str(exc) or "os error 28" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged)) from exc
        raise
    os.replace(staged, path)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def concat_parts(parts: list[Path], out: Path, chunk: int = 64 * 2 ** 20) -> list[str]:
    """Concatenate safetensors ``parts`` into one file ``out`` without decoding a tensor: the merged header
    shifts each part's data offsets, then the data regions are copied in order (bounded memory). Each part
    is deleted once copied. Returns the tensor names written."""
    headers, shift, entries = [], 0, {}
    for part in parts:
        header, start = _read_header(part)
        header.pop("__metadata__", None)
        size = part.stat().st_size - start
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            entries[name] = {**entry, "data_offsets": [begin + shift, end + shift]}
        headers.append((part, start, size))
        shift += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    staged = out.with_name(out.name + ".tmp")
    with open(staged, "wb") as sink:
        sink.write(struct.pack("<Q", len(text)))
        sink.write(text)
        for part, start, size in headers:
            with open(part, "rb") as handle:
                handle.seek(start)
                shutil.copyfileobj(handle, sink, chunk)
    os.replace(staged, out)
    for part, _, _ in headers:
        part.unlink()
    return list(entries)


def write_shards(folder: Path, parts: list[Path], max_shard_size: int) -> int:
    """Group ``parts`` (in order) into shards of at most ``max_shard_size`` bytes (a part larger than that is a
    shard alone), named as ``save_pretrained`` names them, with ``model.safetensors.index.json`` when there is
    more than one. Returns the total bytes of tensor data."""
    groups: list[list[Path]] = []
    size = 0
    for part in parts:
        part_size = part.stat().st_size
        if not groups or size + part_size > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += part_size
    total, weight_map = 0, {}
    for i, group in enumerate(groups, start=1):
        total += sum(_data_bytes(p) for p in group)
        name = SAFE_WEIGHTS if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        for tensor in concat_parts(group, folder / name):
            weight_map[tensor] = name
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def _data_bytes(part: Path) -> int:
    _, start = _read_header(part)
    return part.stat().st_size - start


# --------------------------------------------------------------------------------------------------------
# Calibration hidden states: in memory, or on disk one batch at a time
# --------------------------------------------------------------------------------------------------------
class DiskBatches:
    """A list of per-batch positional inputs ``(hidden_states, *rest)`` whose hidden states live on disk:
    reading an item loads one batch, assigning one writes it to the next generation's folder. :meth:`advance`
    makes the written generation the current one (after a layer has produced every batch's output)."""

    def __init__(self, root: Path, generation: int, rest: list[tuple]):
        self.root, self.generation, self.rest = root, generation, rest
        self.written: set[int] = set()

    def _path(self, generation: int, i: int) -> Path:
        return self.root / f"gen-{generation:05d}" / f"b{i:05d}.safetensors"

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> tuple:
        from safetensors.torch import load_file

        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        generation = self.generation + 1 if i in self.written else self.generation
        return (load_file(str(self._path(generation, i)))["hidden"],) + tuple(self.rest[i])

    def __setitem__(self, i: int, value: tuple) -> None:  # the layer's output for batch i
        path = self._path(self.generation + 1, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_part(path, {"hidden": value[0]})
        self.rest[i] = tuple(value[1:])
        self.written.add(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def advance(self) -> None:
        """The outputs written are now the inputs (the old generation is pruned once the state records it)."""
        self.generation += 1
        self.written.clear()


def save_hidden(inputs: C.LayerInputs, root: Path, generation: int) -> None:
    """Save every batch's hidden states as generation ``generation`` (what a resumed run starts from)."""
    if isinstance(inputs.args, DiskBatches):
        return  # already there
    folder = root / f"gen-{generation:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(inputs)):
        write_part(folder / f"b{i:05d}.safetensors", {"hidden": C.hidden_states(inputs, i)})


def prune_hidden(root: Path, keep: int) -> None:
    """Remove the saved hidden states of every generation but ``keep`` (once the state file points at it)."""
    for old in root.glob("gen-*"):
        if old.name != f"gen-{keep:05d}":
            shutil.rmtree(old, ignore_errors=True)


def load_hidden(inputs: C.LayerInputs, root: Path, generation: int, on_disk: bool) -> None:
    """Replace the captured hidden states by generation ``generation`` (in memory, or as :class:`DiskBatches`)."""
    from safetensors.torch import load_file

    if not inputs.args or any(not args for args in inputs.args):
        raise HFCompressError("the decoder layer takes its hidden states by keyword; streaming needs them as the "
                              "first positional input")
    if on_disk:
        inputs.args = DiskBatches(root, generation, [tuple(args[1:]) for args in inputs.args])
        return
    for i, args in enumerate(inputs.args):
        hidden = load_file(str(root / f"gen-{generation:05d}" / f"b{i:05d}.safetensors"))["hidden"]
        inputs.args[i] = (hidden,) + tuple(args[1:])


# --------------------------------------------------------------------------------------------------------
# State of a run (resume)
# --------------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    settings: dict  # source fingerprint, config, calibration hash, shard size: a resume must match them
    done: list[str] = field(default_factory=list)  # finished units, in order
    parts: list[str] = field(default_factory=list)  # part files written, in order
    layers: list[dict] = field(default_factory=list)  # LayerReport dicts of the quantized linears
    generator: str | None = None  # the random generator's state after the last finished unit
    inputs_generation: int | None = None  # the saved hidden states are the inputs of this decoder layer
    true_sequential: bool = False

    def save(self, folder: Path) -> None:
        path = folder / STATE_FILE
        staged = path.with_name(path.name + ".tmp")
        staged.write_text(json.dumps({"format": STATE_FORMAT, **asdict(self)}, indent=1))
        os.replace(staged, path)

    @classmethod
    def load(cls, folder: Path) -> "RunState | None":
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.pop("format", None) != STATE_FORMAT:
                return None
            return cls(**data)
        except (ValueError, TypeError):
            return None


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return ""


def _generator_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def _set_generator_state(generator: torch.Generator, state: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------
def _check_config(config) -> QuantizationConfig:
    if isinstance(config, dict):
        config = QuantizationConfig.from_dict(config)
    if not isinstance(config, QuantizationConfig):
        raise ConfigError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    if config.method not in INT_METHODS:
        raise ConfigError(f"quantize_checkpoint streams integer methods ({', '.join(INT_METHODS)}); method="
                          f"{config.method!r} works on a model in memory: use hfcompress.quantize")
    return config


def _check_tied(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """A target whose weight is the same parameter as another module's (tied embeddings) cannot be quantized
    (the in-memory path refuses it the same way; on ``meta`` identity says what ``data_ptr`` says there)."""
    owners: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), name)
    for name, module in targets.items():
        owner = owners.get(id(module.weight))
        if owner is not None and owner != f"{name}.weight":
            raise A.QuantizationError(f"{name}.weight is shared with {owner} (tied weights); add {name!r} to "
                                      f"QuantizationConfig.ignore to keep it in floating point")


def _blocks_hash(blocks: torch.Tensor | None) -> str | None:
    return None if blocks is None else hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()


def _unit_prefix(name: str) -> str:
    return name + "." if name else ""


def _estimate_bound(model, layers, source, names, targets, config, blocks, front_bytes, baseline,
                    cache_on_disk: bool) -> MemoryBound:
    """The :class:`MemoryBound` for this model and calibration set (see the module docstring)."""
    def unit_bytes(prefix: str, module: nn.Module) -> int:
        return sum(source.nbytes(names[prefix + k]) for k in _state_names(module) if names.get(prefix + k))

    layer_bytes = max((unit_bytes(_unit_prefix(n), m) for n, m in layers), default=0)
    rest_bytes = max((C.linear_weight(m).numel() * C.linear_weight(m).element_size()
                      for n, m in targets.items() if not any(n.startswith(l + ".") for l, _ in layers)), default=0)
    unit = max(layer_bytes, front_bytes, rest_bytes)
    hidden = getattr(model.config, "hidden_size", None) or 0
    widest = max((C.linear_shape(m)[1] for m in targets.values()), default=hidden)
    cache = 0
    # Quantizing the largest linear: the RTN reference error and the result each make float copies of it
    # (fake-quantized, dequantized) next to its codes.
    largest = max((o * i for o, i in (C.linear_shape(m) for m in targets.values())), default=0)
    work = 4 * largest * 4
    if blocks is not None:
        n, t = blocks.shape
        batch = min(n, C.CALIBRATION_BATCH)
        itemsize = 4  # hidden states kept in the model's float dtype (<= float32)
        cache = n * t * hidden * itemsize
        if cache_on_disk:
            cache = batch * t * hidden * itemsize * 2  # one batch read, its output written
        # Statistics: at most one (in, in) float32 E[x x^T] per linear of the layer (shared inputs share one).
        first = layers[0][0] + "." if layers else ""
        shapes = [C.linear_shape(m) for n, m in targets.items() if n.startswith(first)] or [(widest, widest)]
        work += sum(i * i * 4 for _, i in shapes)
        if config.method == "gptq":
            # gptq_quantize on the widest input: its Hessian copy and at most two more (in, in) matrices while
            # inverting it (gptq.inverse_hessian_cholesky), plus the float32 (stacked) weight with its codes.
            work += 3 * widest * widest * 4 + 2 * sum(o * i for o, i in shapes) * 4
        elif config.method == "awq":
            work += min(n, AWQ_SEARCH_SAMPLES) * t * (2 * hidden + widest) * 4  # cached block calls
        work += batch * t * (4 * hidden + 3 * widest) * 4  # one batch's live activations in the layer
    return MemoryBound(baseline=baseline, unit=unit, cache=cache, work=work)


@locked_output("out_dir")
def quantize_checkpoint(src, out_dir, config: QuantizationConfig | dict, calibration_data=None, tokenizer=None,
                        max_memory=None, max_shard_size="2GB", overwrite: bool = False, progress: bool = True,
                        strict: bool = False, resume: bool = True, extra_files=None,
                        cache_on_disk: bool | None = None) -> Path:
    """Quantize the safetensors checkpoint ``src`` (a local folder, or a Hub id) into the compressed-tensors
    checkpoint ``out_dir`` without ever holding the whole model in memory (see the module docstring).

    Args:
        src: folder with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
        out_dir: destination folder (atomic; a non-empty one is replaced only with ``overwrite=True``).
        config: a :class:`QuantizationConfig` with method ``rtn``, ``gptq`` or ``awq``.
        calibration_data: as :func:`hfcompress.quantize` (texts need ``tokenizer``; when None and the source
            folder has a tokenizer, that one is used). Required for GPTQ/AWQ.
        max_memory: RSS budget ("8GB", "8GiB" or bytes). Refused before starting when one layer cannot be
            quantized within it; exceeded while running, the run stops (finished layers are kept for a
            resume). Default: the memory available when starting (then only a warning when exceeded).
        max_shard_size: largest output shard ("2GB", "500MB" or bytes).
        strict, extra_files: as :func:`hfcompress.quantize` / :func:`hfcompress.save_checkpoint`;
            ``extra_files`` may also be a function of the :class:`~.api.QuantizationReport` returning them
            (a model card that states the coverage).
        resume: continue a previous run's partial output (False: start over). A second run into the same
            ``out_dir`` while one is writing raises :class:`~hfcompress.core.atomic.OutputInUseError`.
        cache_on_disk: keep the calibration hidden states on disk (None: only when they do not fit the budget).

    Returns the output folder. The run's :class:`~.api.QuantizationReport` is in ``config.json`` (``hfcompress``).
    """
    from huggingface_hub.serialization._base import parse_size_to_int

    started = time.perf_counter()
    config = _check_config(config)
    out_dir = Path(out_dir).expanduser().absolute()
    check_destination(out_dir, overwrite)
    budget = parse_memory(max_memory)
    try:
        shard_bytes = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    except (TypeError, ValueError):
        shard_bytes = 0
    if shard_bytes <= 0:
        raise ConfigError(f"max_shard_size={max_shard_size!r} is not a size; write it like '2GB' or '500MB'")

    folder = resolve_checkpoint(src)
    source = Source(folder, read_index(folder))
    model = build_skeleton(folder, source.infos)
    A._check_not_quantized(model)
    names = checkpoint_names(model, source)
    planned = CV.plan(model, config.ignore)
    targets = A.select_targets(model, config.ignore)
    _check_tied(model, targets)
    group_sizes = A._group_sizes(targets, config.group_size)
    if config.needs_calibration and calibration_data is None:
        raise DataError(f"method={config.method!r} needs calibration data: pass calibration_data= (texts, a "
                        f"dataset, 'stdlib' or token ids) and tokenizer=")
    if tokenizer is None:  # saved with the output, and tokenizes text calibration data
        tokenizer = _source_tokenizer(folder)
    blocks = None
    layers = C.find_sequential_layers(model, config.sequential_targets, set(targets))
    if calibration_data is not None:
        try:
            blocks = C.calibration_blocks(calibration_data, tokenizer, config.num_samples, config.seq_len,
                                          seed=config.seed, model_config=model.config)
        except (DataError, ConfigError) as exc:
            if config.method != "rtn" or config.observer != "minmax":
                raise
            warnings.warn(f"not using the calibration data, which rtn with observer='minmax' does not need: {exc}",
                          UserWarning, stacklevel=2)
            blocks = None

    # ---- the memory bound, checked before anything is read ----
    release_memory()
    baseline = rss_bytes()
    front = _front_modules(model, layers)
    front_bytes = sum(source.nbytes(names[_unit_prefix(p) + k]) for p, m in front
                      for k, _ in m.named_parameters(recurse=False) if names.get(_unit_prefix(p) + k))
    available = _available_memory()
    limit = budget if budget is not None else available
    bound = _estimate_bound(model, layers, source, names, targets, config, blocks, front_bytes, baseline,
                            cache_on_disk=bool(cache_on_disk))
    if cache_on_disk is None and blocks is not None:
        if bound.total > limit:
            spilled = _estimate_bound(model, layers, source, names, targets, config, blocks, front_bytes, baseline,
                                      cache_on_disk=True)
            if spilled.total < bound.total:
                logger.info("the calibration hidden states (%s) do not fit in the budget: keeping them on disk",
                            _gib(bound.cache))
                cache_on_disk, bound = True, spilled
        cache_on_disk = bool(cache_on_disk)
    if bound.total > limit:
        what = f"max_memory={max_memory!r} ({_gib(budget)})" if budget is not None else \
            f"the {_gib(available)} of memory available"
        raise MemoryBudgetError(f"{what} cannot hold one decoder layer's quantization: it needs about "
                                f"{bound.describe()}; raise max_memory to at least {_gib(bound.total)}, or lower "
                                f"num_samples/seq_len")
    one_pass = config.method == "gptq" and config.true_sequential and not cache_on_disk
    disk_need = _output_bytes(source, names, targets, config) + (bound.cache if cache_on_disk else 0)
    existing = next(p for p in out_dir.parents if p.is_dir())
    disk_free = shutil.disk_usage(existing).free
    if disk_need > disk_free:
        raise DiskFullError(f"{out_dir.parent} has {_gib(disk_free)} free, but the quantized checkpoint needs about "
                            f"{_gib(disk_need)}; free space or write elsewhere")
    logger.info("streaming %s: peak memory bound %s (budget %s)", folder.name, bound.describe(), _gib(limit))
    if progress:
        tqdm.write(f"hfcompress: streaming {len(layers)} decoder layers; memory bound {bound.describe()}; "
                   f"budget {_gib(limit)}")

    # ---- the staging folder: new, or resumed ----
    staging = out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"
    work = staging / WORK_DIR
    settings = {"source": source.fingerprint(), "config": config.to_dict(), "calibration": _blocks_hash(blocks),
                "max_shard_size": shard_bytes}
    state = RunState.load(work) if resume and staging.is_dir() else None
    if state is not None and state.settings != settings:
        raise ResumeMismatchError(f"{staging} holds a partial run with other settings "
                                  f"({_first_difference(state.settings, settings)}); rerun with the same settings "
                                  f"to resume it, or start over: resume=False, or delete that folder")
    if state is None:
        shutil.rmtree(staging, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        (work / "parts").mkdir(parents=True)
        state = RunState(settings=settings)
        state.save(work)
    elif state.done:
        logger.info("resuming %s: %d unit(s) already done", staging, len(state.done))

    report = A.QuantizationReport(method=config.method, config=config.to_dict(),
                                  calibration_samples=0 if blocks is None else blocks.shape[0])
    steps = A.LayerwiseQuantizer(model, config, targets, group_sizes, report, Rollback(model, keep=False))
    run = _Run(model, source, names, steps, state, work, budget, bound, progress)
    try:
        with torch.no_grad():
            run.restore()
            run.copy_float_tensors(layers)
            if blocks is not None:
                report.true_sequential = run.calibrated_layers(layers, blocks, front, one_pass, cache_on_disk)
            else:
                run.uncalibrated_layers(layers)
            run.rest()
        report.layers = [A.LayerReport(**d) for d in state.layers]
        report.seconds = time.perf_counter() - started
        A.finish_report(model, config, planned, report, strict)
        _write_folder(model, staging, folder, tokenizer, extra_files(report) if callable(extra_files) else extra_files)
        write_shards(staging, [work / "parts" / p for p in state.parts], shard_bytes)
        shutil.rmtree(work)
        from .verify import verify_checkpoint

        verified = verify_checkpoint(staging, deep=False)
        if not verified.ok:
            raise HFCompressError(f"the checkpoint written for {out_dir.name!r} failed verification: "
                                  f"{verified.problems[0]} ({len(verified.problems)} problems)")
        publish(staging, out_dir, overwrite=overwrite)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            _keep_partial(staging, state)
            raise
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(out_dir.parent).free
        raise DiskFullError(f"disk full while writing {out_dir}: the quantized checkpoint needs about "
                            f"{_gib(disk_need)} (plus one shard while the parts are joined); {_gib(free)} are free "
                            f"now that the partial output was removed; free space or write elsewhere") from exc
    except BaseException:  # an error, Ctrl-C: what is done stays for a resume
        _keep_partial(staging, state)
        raise
    peak = peak_rss_bytes()
    logger.info("quantized %s -> %s in %.0f s; peak RSS %s (bound %s)", folder, out_dir,
                time.perf_counter() - started, _gib(peak), _gib(bound.total))
    return out_dir


def _keep_partial(staging: Path, state: RunState) -> None:
    if staging.is_dir():
        logger.warning("stopped after %d finished unit(s); the partial output stays in %s: rerun the same command "
                       "to resume", len(state.done), staging)


def _available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def _source_tokenizer(folder: Path):
    """The source folder's tokenizer, or None when it has none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from ..core.pretrained import load_auto_tokenizer

    return load_auto_tokenizer(folder)


def _front_modules(model: nn.Module, layers) -> list[tuple[str, nn.Module]]:
    """Modules with weights outside the decoder layers that the forward may run before the first layer: all of
    them but the output embeddings (``lm_head``) and what comes after the last layer cannot be told apart
    from the rest generically, so everything outside the layers except the output embeddings."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layer_names = [n for n, _ in layers]
    found = []
    for name, module in model.named_modules():
        if not name or module is output or any(name == l or name.startswith(l + ".") for l in layer_names):
            continue
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            found.append((name, module))
    return found


def _output_bytes(source: Source, names, targets, config) -> int:
    """Estimated bytes of the output checkpoint: packed codes and scales of the targets, other tensors as is."""
    total = 0
    quantized = {f"{n}.weight" for n in targets}
    for key, stored in names.items():
        if stored is None:
            continue
        if key in quantized:
            out, inp = C.linear_shape(targets[key[:-len(".weight")]])
            groups = P.num_groups(inp, config.group_size if config.group_size and inp % config.group_size == 0
                                  else None)
            total += out * inp * config.bits // 8 + out * groups * 4
        else:
            total += source.nbytes(stored)
    return total


def _write_folder(model: nn.Module, folder: Path, source: Path, tokenizer, extra_files) -> None:
    """config.json (as ``save_pretrained`` writes it), generation_config.json, tokenizer, extra files."""
    from .saving import _write_extra_files

    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        generation = model.generation_config
        if (source / "generation_config.json").is_file():  # what from_pretrained would have read
            from transformers import GenerationConfig

            generation = GenerationConfig.from_pretrained(source)
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if extra_files:
        _write_extra_files(folder, extra_files)


class _Run:
    """One run's units over the skeleton: reads, quantizes, writes parts, records the state."""

    def __init__(self, model, source, names, steps: A.LayerwiseQuantizer, state: RunState, work: Path,
                 budget: int | None, bound: MemoryBound, progress: bool):
        self.model, self.source, self.names, self.steps = model, source, names, steps
        self.state, self.work, self.budget, self.bound, self.progress = state, work, budget, bound, progress
        self.warned = False
        self.dtypes = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items()}  # as from_pretrained casts

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Put back what finished units did to the skeleton: their linears become (meta) CompressedLinear
        modules of the recorded scheme, so that the coverage and quantization_config see them."""
        config = self.steps.config
        for entry in self.state.layers:
            name = entry["name"]
            module = self.steps.targets.get(name)
            if module is None:
                continue
            out_features, in_features = C.linear_shape(module)
            placeholder = CompressedLinear(
                in_features, out_features, entry["bits"], entry["group_size"], symmetric=config.symmetric,
                bias=getattr(module, "bias", None) is not None, scale_dtype=module.weight.dtype, device="meta",
                zero_point_rows=ct_format.zero_point_rows(out_features, entry["bits"]))
            A._replace(self.model, name, placeholder)
            self.steps.targets[name] = None
        if self.state.generator is not None:
            _set_generator_state(self.steps.generator, self.state.generator)

    def finish(self, unit: str, tensors: dict[str, torch.Tensor], layers_before: int) -> None:
        """Write ``unit``'s tensors as a part and record it done (with the reports it added)."""
        part = f"{len(self.state.parts):06d}.safetensors"
        if tensors:
            write_part(self.work / "parts" / part, tensors)
            self.state.parts.append(part)
        self.state.layers.extend(asdict(layer) for layer in self.steps.report.layers[layers_before:])
        self.state.done.append(unit)
        self.state.generator = _generator_state(self.steps.generator)
        self.state.save(self.work)
        self.check_memory(unit)

    def check_memory(self, where: str) -> None:
        release_memory()
        rss = rss_bytes()
        if self.budget is not None and rss > self.budget:
            raise MemoryBudgetError(f"RSS {_gib(rss)} after {where} exceeds max_memory ({_gib(self.budget)}); the "
                                    f"finished layers are kept: rerun with a larger max_memory to resume")
        if rss > self.bound.total and not self.warned:
            self.warned = True
            logger.warning("RSS %s after %s is above the estimated bound %s", _gib(rss), where,
                           _gib(self.bound.total))

    def postfix(self) -> str:
        return f"rss {rss_bytes() / GIB:.2f}/{self.bound.total / GIB:.2f} GiB"

    # ---- units ----------------------------------------------------------------------------------------
    def copy_float_tensors(self, layers) -> None:
        """Tensors outside the decoder layers that no target holds: copied one at a time."""
        layer_prefixes = tuple(n + "." for n, _ in layers)
        quantized = {f"{n}.weight" for n in self.steps.targets}
        quantized |= {f"{n}.bias" for n in self.steps.targets}
        for key, stored in self.names.items():
            if stored is None or key.startswith(layer_prefixes) or key in quantized:
                continue
            unit = f"tensor:{key}"
            if unit in self.state.done:
                continue
            with TensorReader(self.source.infos) as reader:
                tensor = reader.get(stored)
            if tensor.is_floating_point() and self.dtypes[key].is_floating_point:
                tensor = tensor.to(self.dtypes[key])
            self.finish(unit, {key: tensor}, len(self.steps.report.layers))
            del tensor

    def uncalibrated_layers(self, layers) -> None:
        bar = tqdm(layers, desc=f"{self.steps.config.method} {self.steps.config.bits}-bit", unit="layer",
                   disable=not self.progress)
        for name, layer in bar:
            if name in self.state.done:
                continue
            prefix = _unit_prefix(name)
            load_module(layer, prefix, self.source, self.names)
            before = len(self.steps.report.layers)
            inside = self.steps.inside(name)
            if inside:
                A._check_weights(self.model, inside)
            self.steps.quantize_uncalibrated(inside)
            layer = self.model.get_submodule(name)
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
            self.finish(name, tensors, before)
            del tensors
            unload_module(layer)
            bar.set_postfix_str(self.postfix())

    def calibrated_layers(self, layers, blocks, front, one_pass: bool, on_disk: bool) -> bool:
        """Every decoder layer calibrated on the outputs of the quantized ones before it. Returns whether
        GPTQ ran in one pass per layer."""
        config = self.steps.config
        todo = [i for i, (name, _) in enumerate(layers) if name not in self.state.done]
        if not todo:
            return self.state.true_sequential
        autocast = lambda: C.calibration_autocast(self.model, config.calibration_dtype)  # noqa: E731
        # The modules in front of the first layer (embeddings), for the calibration tokens' first-layer inputs.
        for prefix_name, module in front:
            load_module(module, _unit_prefix(prefix_name), self.source, self.names)
        try:
            with autocast(), _layers_skipped(layers):
                inputs = C.capture_first_layer_inputs(self.model, layers[0][1], blocks)
                C.capture_layer_kwargs(self.model, [layer for _, layer in layers], blocks, inputs)
        finally:
            for _, module in front:
                unload_module(module)
        first_kwargs = list(inputs.kwargs)
        if not (inputs.args and all(inputs.args)):
            raise HFCompressError(f"{type(layers[0][1]).__name__} receives its hidden states by keyword; streaming "
                                  f"needs them as the first positional input")
        start = todo[0]
        root = self.work / "inputs"
        if start > 0:
            if self.state.inputs_generation != start:
                raise ResumeMismatchError(f"the saved calibration inputs are not those of decoder layer "
                                          f"{layers[start][0]}; start over: resume=False, or delete "
                                          f"{self.work.parent}")
            load_hidden(inputs, root, start, on_disk)
            one_pass = self.state.true_sequential
        else:
            A._check_finite_activations(inputs, f"the inputs of the first decoder layer {layers[0][0]} (the "
                                                f"embeddings of the calibration tokens)")
            if one_pass:
                self.bound.in_flight = S.in_flight_bytes(inputs, self.steps.remaining())
                limit = self.budget if self.budget is not None else _available_memory()
                if self.bound.total > limit:
                    logger.warning("GPTQ true_sequential: one pass per layer would need %s; running two passes "
                                   "per layer instead", _gib(self.bound.total))
                    self.bound.in_flight, one_pass = 0, False
            self.state.true_sequential = one_pass
            if on_disk:
                save_hidden(inputs, root, 0)
                load_hidden(inputs, root, 0, on_disk=True)
        bar = tqdm(layers, desc=f"{config.method} {config.bits}-bit", unit="layer", disable=not self.progress,
                   initial=start, total=len(layers))
        last = layers[-1][0]
        for index in todo:
            name, layer = layers[index]
            prefix = _unit_prefix(name)
            load_module(layer, prefix, self.source, self.names)
            inside = self.steps.inside(name)
            if inside:
                A._check_weights(self.model, inside)
            before = len(self.steps.report.layers)
            C.use_layer_kwargs(inputs, index, first_kwargs)
            self.steps.quantize_layer(name, layer, inputs, autocast, one_pass, propagate=name != last)
            layer = self.model.get_submodule(name)
            if name != last:
                if isinstance(inputs.args, DiskBatches):
                    inputs.args.advance()
                else:
                    save_hidden(inputs, root, index + 1)
                self.state.inputs_generation = index + 1
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
            self.finish(name, tensors, before)
            del tensors
            if name != last:
                prune_hidden(root, index + 1)
            unload_module(layer)
            bar.update(1)
            bar.set_postfix_str(self.postfix())
        bar.close()
        del inputs
        shutil.rmtree(root, ignore_errors=True)
        return one_pass

    def rest(self) -> None:
        """Targets outside the decoder layers (``lm_head`` when not ignored): round to nearest, one at a time."""
        for name, module in self.steps.remaining().items():
            if name in self.state.done:
                continue
            prefix = _unit_prefix(name)
            load_module(module, prefix, self.source, self.names)
            A._check_weights(self.model, {name: module})
            before = len(self.steps.report.layers)
            self.steps.quantize_uncalibrated({name: module})
            quantized = self.model.get_submodule(name)
            tensors = {prefix + k: v for k, v in quantized.state_dict().items()}
            self.finish(name, tensors, before)
            unload_module(quantized)


@contextlib.contextmanager
def _layers_skipped(layers):
    """While capturing inputs, a decoder layer still on ``meta`` returns its hidden states unchanged (the
    capture of mixed layer types runs every layer's pre-hook; nothing computed by a layer is kept)."""
    originals = []
    for _, layer in layers:
        originals.append((layer, layer.forward))

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs.get("hidden_states")

        layer.forward = passthrough
    try:
        yield
    finally:
        for layer, forward in originals:
            del layer.forward
            if layer.forward != forward:  # pragma: no cover - an instance attribute set before us
                layer.forward = forward
