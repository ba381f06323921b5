"""Loading models and tokenizers from a folder or a Hub id, with one-line errors for user mistakes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.errors import ModelLoadError
from ..core.gguf import (  # noqa: F401  (GGUF files as an input; re-exported for callers of this module)
    GgufInfo,
    check_gguf_file,
    find_gguf_file,
    gguf_note,
    is_gguf_path,
    load_gguf_model,
)
from ..core.pretrained import load_auto_tokenizer, load_causal_lm

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Weight formats that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "HFCOMPRESS_ALLOW_PICKLE"


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint stores its weights only as pickles, and pickles were not allowed."""


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it is a folder holding a model (``config.json``); else raise clearly."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a file; pass the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json")
    return path


def is_local_reference(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~"))


# scheme -> function(rest of the name) -> a model folder or Hub id. ``reference`` is registered by
# hfcompress/models/__init__.py, so this module never imports the reference trainer (which imports the
# evaluator, which imports this module).
_RESOLVERS: dict = {}


def register_resolver(scheme: str, resolve) -> None:
    """Make ``"<scheme>:<name>"`` usable wherever a model path is expected: ``resolve(name)`` -> folder/Hub id."""
    _RESOLVERS[scheme] = resolve


def resolve_model(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """A local model folder (checked), a local ``.gguf`` file (checked) or a Hub id (left to ``from_pretrained``).

    ``reference:small`` / ``reference:base`` name the cached reference teachers (trained on first use); other
    schemes can be added with :func:`register_resolver`. A GGUF is named by its path, by a folder holding
    exactly one ``.gguf`` file and no ``config.json``, or by a folder plus ``gguf_file``; it resolves to the
    path of the file.
    """
    name = os.fspath(name_or_path)
    scheme, colon, rest = name.partition(":")
    if colon and scheme in _RESOLVERS and not os.path.exists(os.path.expanduser(name)):
        return str(_RESOLVERS[scheme](rest))
    gguf_path = find_gguf_file(name, gguf_file)
    if gguf_path is not None:
        return str(check_gguf_file(gguf_path).path)
    if is_local_reference(name):
        return str(check_model_dir(name))
    return name


def placement_kwargs(device=None, device_map=None) -> dict:
    """``from_pretrained`` arguments that put the weights on ``device`` (checked: a missing GPU is a one-line
    error) or spread them with an accelerate ``device_map`` ("auto", {"": 0}, ...); {} keeps the CPU."""
    from ..core.devices import resolve_device

    if device_map is not None:
        if device is not None:
            raise ModelLoadError(f"pass device ({device!r}) or device_map ({device_map!r}), not both")
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            return {"device_map": str(resolve_device(device_map))}
        return {"device_map": device_map}
    if device is None:
        return {}
    resolved = resolve_device(device)
    return {} if resolved.type == "cpu" else {"device_map": str(resolved)}


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """``allow_pickle`` when given, else the ``HFCOMPRESS_ALLOW_PICKLE`` environment variable (which the CLI's
    ``--allow-pickle`` sets, so subprocesses such as recipe evaluations inherit it)."""
    if allow_pickle is not None:
        return bool(allow_pickle)
    return os.environ.get(ALLOW_PICKLE_ENV, "").lower() in ("1", "true", "yes")


def safe_weights_kwargs(resolved: str, allow_pickle: bool | None = None, **kwargs) -> dict:
    """``from_pretrained`` kwargs that read safetensors only, unless pickles are allowed.

    A local folder whose weights exist only as pickles (``pytorch_model.bin``, ``*.pt``) is refused here with
    the way out; a Hub id gets ``use_safetensors=True`` (transformers then refuses pickle-only repositories).
    GGUF files are not pickles and are left alone.
    """
    if pickle_allowed(allow_pickle) or "gguf_file" in kwargs or "use_safetensors" in kwargs:
        return {}
    path = Path(resolved)
    if not path.is_dir():
        return {"use_safetensors": True}
    names = [f.name for f in path.iterdir() if f.is_file()]
    if any(name.endswith(".safetensors") for name in names):
        return {"use_safetensors": True}
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and n != "training_args.bin")
    if pickles:
        raise UnsafeCheckpointError(
            f"{resolved!r} stores its weights only as pickle files ({', '.join(pickles[:3])}), which can run code "
            f"when loaded; hfcompress reads safetensors only. Convert it to safetensors, or if you trust it pass "
            f"--allow-pickle (CLI) / allow_pickle=True (Python) / {ALLOW_PICKLE_ENV}=1")
    return {}


def load_model(name_or_path, *, trust_remote_code: bool = False, allow_pickle: bool | None = None, device=None,
               device_map=None, gguf_file: str | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` behind a clear error. ``kwargs`` go to ``from_pretrained``;
    ``device`` / ``device_map`` place the weights (see :func:`placement_kwargs`).

    Only safetensors weights are read unless ``allow_pickle`` (see :func:`safe_weights_kwargs`); remote code
    runs only when the caller asks for it (``trust_remote_code``). A ``.gguf`` reference (see
    :func:`resolve_model`) is dequantized to a plain float model (:func:`load_gguf_model`).
    """
    resolved = resolve_model(name_or_path, gguf_file)
    kwargs.update(placement_kwargs(device, device_map))
    if is_gguf_path(resolved):
        return load_gguf_model(resolved, trust_remote_code=trust_remote_code, **kwargs)
    safe = safe_weights_kwargs(resolved, allow_pickle, **kwargs)
    try:
        return load_causal_lm(resolved, trust_remote_code=trust_remote_code, **safe, **kwargs)
    except ModelLoadError as exc:
        if safe and "safetensors" in str(exc):
            raise ModelLoadError(f"{exc} (only safetensors weights are read: if the repository has only pickle "
                                 f"weights and you trust it, pass --allow-pickle / allow_pickle=True)") from exc
        raise


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False, gguf_file: str | None = None, **kwargs):
    """``AutoTokenizer.from_pretrained`` behind a clear error; a GGUF's tokenizer is built from its metadata."""
    # A .gguf path resolves to the file; core.pretrained reads its tokenizer from the file's folder.
    tokenizer = load_auto_tokenizer(resolve_model(name_or_path, gguf_file), trust_remote_code=trust_remote_code,
                                    **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of weight files in a checkpoint folder (safetensors/bin shards), excluding tokenizer/config."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def quantization_method(path: str | os.PathLike) -> str | None:
    """``quant_method`` of a local checkpoint's config.json (``None`` for a plain model or a Hub id)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method")


def load_for_inference(name_or_path, runtime: str = "auto", progress: bool = False, device=None, device_map=None):
    """Load a model for evaluation/generation.

    ``runtime='auto'`` (or ``'packed'``) loads compressed-tensors checkpoints with
    :func:`hfcompress.load_compressed`, which keeps the weights packed and runs the native int4/int8 kernels
    (or, with ``device="cuda"``, PyTorch's GPU kernels); ``'transformers'`` (and every other checkpoint) goes
    through plain ``from_pretrained`` on ``device`` or spread by ``device_map``.
    """
    resolved = resolve_model(name_or_path)
    if runtime in ("auto", "packed") and quantization_method(resolved) == "compressed-tensors":
        from ..quantization.runtime import load_compressed

        if device_map is not None and not (isinstance(device_map, str) and device is None
                                           and device_map not in ("auto", "balanced", "balanced_low_0",
                                                                  "sequential")):
            raise ModelLoadError(f"device_map={device_map!r}: the packed runtime loads onto one device; pass "
                                 f"device= instead (or runtime='transformers' to let accelerate place the layers)")
        return load_compressed(resolved, progress=progress, device=device if device_map is None else device_map)
    return load_model(resolved, device=device, device_map=device_map)
