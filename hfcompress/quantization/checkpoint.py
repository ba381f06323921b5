"""Reading checkpoint folders: config.json, safetensors shards (with integrity checks), and the
compressed-tensors ``quantization_config`` resolved to one scheme per module.

Shared by the packed runtime (:mod:`hfcompress.quantization.runtime`) and ``verify`` (:mod:`.verify`), so both
agree on what a well-formed checkpoint is and name the same file/tensor when it is not.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ModelLoadError


class CheckpointError(ModelLoadError):
    """A checkpoint folder is missing, malformed, corrupted, or does not match its config.json."""


class UnsupportedSchemeError(CheckpointError):
    """A checkpoint uses a quantization scheme the packed runtime does not run (e.g. activation quantization)."""


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Files fetched from the Hub for a checkpoint (weights, configs, tokenizer); never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]

# safetensors dtype tag -> (bytes per element, torch dtype)
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16),
    "I8": (1, torch.int8), "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "U16": (2, torch.uint16), "U32": (4, torch.uint32), "U64": (8, torch.uint64),
}


# ------------------------------------------------------------------------------------------------------
# Folder, config
# ------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_repo: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded with ``huggingface_hub.snapshot_download``."""
    name = os.fspath(path_or_repo)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.exists():
            raise CheckpointError(f"checkpoint folder {name!r} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{name!r} is a file; pass the checkpoint folder that holds config.json")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, not found: all user-facing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not download {name!r} from the Hugging Face Hub: {first}") from exc


def read_config(folder: Path) -> dict:
    """config.json as a dict, or a one-line error naming the folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a checkpoint: it has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def quant_method(config: dict) -> str | None:
    """``quantization_config.quant_method`` of a config.json dict (None for a plain checkpoint)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError("config.json: quantization_config is not a JSON object")
    return str(qc.get("quant_method", ""))


# ------------------------------------------------------------------------------------------------------
# safetensors files
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][1]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file -> its info, read with ``safetensors.safe_open``.

    ``safe_open`` checks the header against the file (valid JSON, offsets that match each tensor's shape and
    dtype, tensors that exactly fill the file), so truncation and garbage are caught; its errors become one
    :class:`CheckpointError` line naming the file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            entries = {name: (piece.get_dtype(), tuple(int(d) for d in piece.get_shape()))
                       for name, piece in slices.items()}
    except SafetensorError as exc:
        raise CheckpointError(_safetensors_problem(path, exc)) from exc
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read the safetensors file ({exc})") from exc
    infos = {}
    for name, (dtype, shape) in entries.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        infos[name] = TensorInfo(name, path, dtype, shape)
    return infos


def _safetensors_problem(path: Path, exc: Exception) -> str:
    """safe_open's error -> what it means for the user, in one line."""
    reason = str(exc).strip().splitlines()[0].removeprefix("Error while deserializing header: ")
    size = path.stat().st_size if path.exists() else 0
    if "header too small" in reason:
        return f"{path.name}: truncated safetensors file ({size} bytes, no header)"
    if "invalid header length" in reason:
        return f"{path.name}: corrupted or truncated safetensors file (its header is longer than the {size} bytes)"
    if "not fully covered" in reason:
        return (f"{path.name}: truncated, or with bytes after the last tensor: the tensors its header lists do "
                f"not exactly fill its {size} bytes (a partial download or a partly overwritten file)")
    return f"{path.name}: corrupted safetensors header ({reason})"


def read_index(folder: Path, problems: list[str] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint -> its info, from ``model.safetensors`` or the sharded index.

    Checks that the index names existing shards and that each shard holds exactly the tensors the index
    assigns to it. With ``problems`` given, shard-level problems are appended there (and the readable
    shards still returned) instead of raising on the first.
    """

    def report(message: str) -> None:
        if problems is None:
            raise CheckpointError(message)
        problems.append(message)

    index_path, single = folder / SAFE_INDEX, folder / SAFE_WEIGHTS
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            by_file: dict[str, set[str]] = {}
            for tensor, file in weight_map.items():
                by_file.setdefault(str(file), set()).add(tensor)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index_path.name}: not a valid safetensors index ({exc})") from exc
        infos: dict[str, TensorInfo] = {}
        for file, names in sorted(by_file.items()):
            shard = folder / file
            if not shard.is_file():
                report(f"{index_path.name} lists shard {file!r}, which is missing from {folder}")
                continue
            try:
                header = read_safetensors_header(shard)
            except CheckpointError as exc:
                report(str(exc))
                continue
            missing = sorted(names - header.keys())
            if missing:
                report(f"{index_path.name} maps tensor {missing[0]!r} to {file}, which does not contain it "
                       f"({len(missing)} such tensors)")
            extra = sorted(header.keys() - names)
            if extra:
                report(f"{file} holds tensor {extra[0]!r} that {index_path.name} does not list "
                       f"({len(extra)} such tensors)")
            infos.update({name: info for name, info in header.items() if name in names})
        listed = set(by_file)
        for stray in sorted(p.name for p in folder.glob("*.safetensors") if p.name not in listed):
            report(f"{stray} is in the folder but {index_path.name} does not list it (stale shard?)")
        return infos
    if single.is_file():
        return read_safetensors_header(single)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {others[0]}; only safetensors are loaded, never pickles)" if others else ""
    raise CheckpointError(f"{str(folder)!r} has no {SAFE_WEIGHTS} or {SAFE_INDEX}{hint}")


class TensorReader:
    """Reads tensors by name from the checkpoint's safetensors files (files opened once, lazily)."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = self._stack.enter_context(
                    safe_open(str(info.file), framework="pt", device="cpu"))
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{info.file.name}: cannot read tensor {name!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------
# compressed-tensors quantization_config
# ------------------------------------------------------------------------------------------------------
PACKED_FORMAT = "pack-quantized"


def load_ct_config(qc: dict):
    """config.json's quantization_config -> ``compressed_tensors.quantization.QuantizationConfig``."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    try:
        return QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise CheckpointError(f"config.json: invalid compressed-tensors quantization_config at {where!r}: "
                              f"{first.get('msg')}") from exc


def parse_ct_config(qc: dict):
    """Like :func:`load_ct_config`, also rejecting (one line, naming the group) what the packed runtime
    cannot run exactly."""
    config = load_ct_config(qc)
    if config.kv_cache_scheme is not None:
        raise UnsupportedSchemeError("config.json: kv_cache_scheme (KV-cache quantization) is not supported by "
                                     "the packed runtime; load with transformers.from_pretrained instead")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise UnsupportedSchemeError(f"config.json: quantization_config.{key} is set; the packed runtime only "
                                         "runs weight-only pack-quantized checkpoints")
    for group_name, scheme in config.config_groups.items():
        problem = scheme_support_problem(group_name, scheme, config.format)
        if problem:
            raise UnsupportedSchemeError(problem)
    return config


def scheme_support_problem(group_name: str, scheme, global_format: str | None) -> str | None:
    """Why the packed runtime cannot run this config group, or None."""
    where = f"config.json: config_groups.{group_name}"
    if scheme.input_activations is not None or scheme.output_activations is not None:
        return f"{where} quantizes activations; the packed runtime runs weight-only schemes (e.g. W4A16, W8A16)"
    weights = scheme.weights
    if weights is None:
        return f"{where} has no weight quantization"
    fmt = scheme.format or global_format
    if fmt not in (PACKED_FORMAT, None, "mixed-precision"):
        return f"{where} is stored as {fmt!r}; the packed runtime reads {PACKED_FORMAT!r}"
    if weights.type != "int":
        return f"{where} uses {weights.type} weights; only integer weights are supported"
    if not 2 <= weights.num_bits <= 8:
        return f"{where} uses {weights.num_bits}-bit weights; supported: 2..8 bits"
    if weights.strategy not in ("channel", "group", "tensor"):
        return f"{where} uses the {weights.strategy!r} strategy; supported: channel, group, tensor"
    if weights.dynamic:
        return f"{where} has dynamic weight quantization, which stores no scales"
    if weights.strategy == "group" and not weights.group_size:
        return f"{where} uses the group strategy without a group_size"
    return None


def module_schemes(model: torch.nn.Module, config) -> dict[str, object]:
    """Module name -> QuantizationScheme, matched with compressed-tensors' own target/ignore rules
    (first matching config group wins, as in ``apply_quantization_config``)."""
    from compressed_tensors.utils.match import match_named_modules, match_targets

    target_to_scheme = {}
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    schemes = {}
    for name, module in match_named_modules(model, list(target_to_scheme), config.ignore or []):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            matched = match_targets(name, module, list(target_to_scheme))
            schemes[name] = target_to_scheme[matched[0]]
    return schemes


def weight_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features or rows, in_features or columns) of a Linear/Embedding weight."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


def num_groups(in_features: int, weights) -> int:
    if weights.strategy == "group":
        return math.ceil(in_features / weights.group_size)
    return 1


def expected_ct_tensors(name: str, module: torch.nn.Module, weights) -> dict[str, tuple[tuple[int, ...], set]]:
    """Tensors a pack-quantized module stores: ``{tensor name: (shape, allowed dtypes)}``.

    ``weight_packed`` (N, ceil(K*b/32)) int32; ``weight_scale`` (N, G) float; ``weight_shape`` (2,) int;
    asymmetric: ``weight_zero_point`` packed along N, (ceil(N*b/32), G) int32 (or unpacked (N, G)).
    ``tensor`` strategy stores one scale (1,) or (1, 1).
    """
    n, k = weight_dims(module)
    b = weights.num_bits
    groups = num_groups(k, weights)
    floats = {"F32", "F16", "BF16"}
    scale_shapes = {"tensor": (1,)}.get(weights.strategy, (n, groups))
    expected = {
        f"{name}.weight_packed": ((n, math.ceil(k * b / 32)), {"I32"}),
        f"{name}.weight_scale": (scale_shapes, floats),
        f"{name}.weight_shape": ((2,), {"I64", "I32"}),
    }
    if not weights.symmetric:
        expected[f"{name}.weight_zero_point"] = ((math.ceil(n * b / 32), groups), {"I32"})
    return expected


def check_zero_point(info: TensorInfo, n: int, groups: int, num_bits: int) -> str | None:
    """Zero points are packed int32 along N: (ceil(N*b/32), G), or those words zero-padded to N rows (what
    hfcompress writes where compressed-tensors 0.20 allocates the unpacked shape when loading); older
    writers stored them unpacked (N, G) as int8 or float."""
    packed = (math.ceil(n * num_bits / 32), groups)
    if info.dtype == "I32" and info.shape in (packed, (n, groups)):
        return None
    if info.dtype in ("I8", "F32", "F16", "BF16") and info.shape in ((n, groups), (n,)):
        return None
    return (f"tensor {info.name!r} in {info.file.name} has {info.dtype} {list(info.shape)}, expected packed "
            f"int32 {list(packed)} (or zero-padded to {n} rows) or unpacked ({n}, {groups})")
