"""GGUF files (llama.cpp's format) as an input: read their header, refuse what cannot load, and dequantize them
to a plain float model through transformers' own GGUF loader. In core, so the engines (a ``.gguf`` teacher path in
``DistillationTrainer``) and :mod:`hfcompress.models.loading` share it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format) as an input: dequantized through transformers' own GGUF loader
# --------------------------------------------------------------------------------------------------------
GGUF_SUFFIX = ".gguf"
# Tensor types that hold plain floats: a file with only these carries no quantization error.
_FLOAT_GGUF_TYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says, read before transformers loads it."""

    path: Path
    architecture: str
    tensor_types: tuple[str, ...]  # sorted names of the ggml types its tensors are stored in ("F32", "Q4_1", ...)

    @property
    def quantized_types(self) -> tuple[str, ...]:
        return tuple(t for t in self.tensor_types if t not in _FLOAT_GGUF_TYPES)

    def describe(self) -> str:
        """One sentence for logs and model cards: where the float weights came from."""
        if not self.quantized_types:
            return (f"The base weights were read from the GGUF file `{self.path.name}` "
                    f"(stored as {', '.join(self.tensor_types)}: plain floats, no quantization error).")
        return (f"The base weights were dequantized from the GGUF file `{self.path.name}` "
                f"(stored as {', '.join(self.tensor_types)}): they carry that file's quantization error, so "
                f"quality is measured against the dequantized model, not the original full-precision one.")


def is_gguf_path(name: str | os.PathLike) -> bool:
    return os.fspath(name).lower().endswith(GGUF_SUFFIX)


def find_gguf_file(name: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> Path | None:
    """The ``.gguf`` file a model reference names, or ``None`` when it names none.

    ``name`` is a ``.gguf`` path, or a folder with ``gguf_file`` inside it, or a folder without
    ``config.json`` that holds exactly one ``.gguf`` file (several: an error naming them).
    """
    path = Path(os.fspath(name)).expanduser()
    if gguf_file is not None:
        file = Path(os.fspath(gguf_file)).expanduser()
        return file if file.is_absolute() or path.suffix.lower() == GGUF_SUFFIX else path / file
    if is_gguf_path(path):
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
        if len(found) > 1:
            raise ModelLoadError(f"{str(path)!r} holds {len(found)} .gguf files ({', '.join(found)}); pass the "
                                 f"path of the one to load (or gguf_file=...)")
        if found:
            return path / found[0]
    return None


def check_gguf_file(path: str | os.PathLike) -> GgufInfo:
    """Read a GGUF file's header and tensor table (memory-mapped, nothing dequantized); raise one clear line
    if the file is missing, unreadable (truncated, corrupt), of an architecture transformers cannot load, or
    the ``gguf`` package is not installed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(f"reading {path.name} needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # the reader fails with ValueError/KeyError/IndexError deep in numpy on bad bytes
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file (truncated or corrupt?): "
                             f"{_first_line(exc)}") from exc
    if end > path.stat().st_size:
        raise ModelLoadError(f"{str(path)!r} is truncated: its tensors need {end:,} bytes, the file has "
                             f"{path.stat().st_size:,}")
    supported = _gguf_architectures()
    if supported is not None and architecture not in supported:
        raise ModelLoadError(f"{path.name}: GGUF architecture {architecture!r} is not supported by transformers' "
                             f"GGUF loader (supported: {', '.join(sorted(supported))})")
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    return GgufInfo(path=path.resolve(), architecture=architecture, tensor_types=types)


def _gguf_architectures() -> set[str] | None:
    """Architectures transformers' GGUF loader reads (legacy table and the newer block-keeping path).

    Glue to transformers internals, kept in this one function: ``None`` (check skipped, transformers' own
    error applies) when the names move.
    """
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def load_gguf_model(path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs):
    """A GGUF file as a plain float ``AutoModelForCausalLM`` that saves like any other checkpoint.

    transformers loads GGUF through its ``GgufHfQuantizer``. When that quantizer stays attached to the model
    (as it does for architectures of its legacy loader, Llama included, even though every weight is already
    dequantized), ``save_pretrained`` refuses the model, because ``GgufHfQuantizer.is_serializable()`` is
    ``False``. Asking for ``GgufConfig(dequantize=True)`` is transformers' own switch for "unpack every weight
    into a plain dense model": its ``postprocess_model`` then calls ``remove_quantization_config``, which drops
    ``hf_quantizer``, ``config.quantization_config`` and ``is_quantized``, so the model saves normally (same
    tensors: checked in tests/test_gguf.py).
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    info = check_gguf_file(path)
    if info.quantized_types:
        logger.warning("%s stores its weights quantized (%s); they are dequantized to float, so this model "
                       "carries that quantization error: compare against it, not the original model",
                       info.path.name, ", ".join(info.quantized_types))
    kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(info.path.parent), gguf_file=info.path.name,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {str(info.path)!r}: {_first_line(exc)}") from exc
    model.hfcompress_gguf = info  # read by model cards (gguf_note)
    return model


def gguf_note(model_ref) -> str | None:
    """The model-card sentence for a model that came from a GGUF file (``None`` for anything else)."""
    if model_ref is None or isinstance(model_ref, (str, os.PathLike)):
        name = os.fspath(model_ref) if model_ref is not None else ""
        if not name or name.startswith("reference:"):
            return None
        try:
            path = find_gguf_file(name)
        except ModelLoadError:
            return None
        return check_gguf_file(path).describe() if path is not None and path.is_file() else None
    info = getattr(model_ref, "hfcompress_gguf", None)
    return info.describe() if info is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
