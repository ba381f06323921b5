"""``from_pretrained`` behind a one-line :class:`~hfcompress.core.errors.ModelLoadError`.

The one place that turns transformers' loading exceptions into our error. It takes a folder or a Hub id as
is: model references such as ``reference:small`` are resolved above it, by
:func:`hfcompress.models.loading.resolve_model` (the jobs, the CLI and the scripts resolve before loading), so
the engines (quantization/, distillation/) can load a path without importing up the layers.
"""

from __future__ import annotations

import os
import re

from .errors import ModelLoadError

# "<scheme>:<name>" that is not a path nor a Hub id ("reference:small"); resolved by models.loading.
_REFERENCE = re.compile(r"^[A-Za-z][\w-]*:(?![/\\])")


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``./x``, ``/x``, ``~/x``; a Hub id has at most one ``/``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def from_pretrained(auto_class, name_or_path, what: str = "a causal LM", **kwargs):
    """``auto_class.from_pretrained(name_or_path, **kwargs)``; a failure is one ``ModelLoadError`` line."""
    name = os.fspath(name_or_path)
    if _REFERENCE.match(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(f"{name!r} is a model reference, not a path or a Hub id: resolve it first with "
                             f"hfcompress.models.loading.resolve_model (or pass the loaded model)")
    from safetensors import SafetensorError

    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(f"could not load {what} from {name!r}: the folder does not exist; check the path")
    kwargs.setdefault("trust_remote_code", False)
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except SafetensorError as exc:
        bad = unreadable_safetensors(name)
        raise ModelLoadError(f"could not load {what} from {name!r}: {bad or 'a safetensors file'} is truncated or "
                             f"corrupt ({exc}); download or save the checkpoint again") from exc
    except (OSError, ValueError, KeyError) as exc:
        first_line = _first_line(exc)
        if "Unrecognized configuration class" in first_line:
            first_line = (first_line.rstrip(".") + "; it is not a causal language model (AutoModelForCausalLM "
                          "supports decoder LMs such as Llama, Qwen2, Mistral, GPT-2)")
        raise ModelLoadError(f"could not load {what} from {name!r}: {first_line}") from exc


def unreadable_safetensors(folder: str | os.PathLike) -> str | None:
    """Name of the first ``*.safetensors`` file in ``folder`` whose header cannot be read, else None."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError):
            return path.name
    return None


def load_causal_lm(name_or_path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with a clear error (kwargs go to ``from_pretrained``); a ``.gguf``
    file is dequantized to a plain float model (:func:`hfcompress.core.gguf.load_gguf_model`)."""
    from transformers import AutoModelForCausalLM

    from .gguf import is_gguf_path, load_gguf_model

    if is_gguf_path(name_or_path):
        return load_gguf_model(name_or_path, **kwargs)
    return from_pretrained(AutoModelForCausalLM, name_or_path, "a causal LM", **kwargs)


def load_auto_tokenizer(name_or_path, **kwargs):
    """``AutoTokenizer.from_pretrained`` with a clear error; a ``.gguf`` file's tokenizer is built from its
    metadata."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .gguf import is_gguf_path

    if is_gguf_path(name_or_path):
        kwargs = {**kwargs, "gguf_file": Path(name_or_path).name}
        name_or_path = str(Path(name_or_path).expanduser().parent)
    return from_pretrained(AutoTokenizer, name_or_path, "a tokenizer", **kwargs)
