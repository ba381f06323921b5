"""hfcompress: distill and quantize Hugging Face Transformers models into small, Hub-ready checkpoints.

The public API is imported lazily so that ``import hfcompress`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "HFCompressError": "hfcompress.errors",
    "load_texts": "hfcompress.data",
    "load_blocks": "hfcompress.data",
    "pack_blocks": "hfcompress.data",
    "load_stdlib_corpus": "hfcompress.data",
    "reference_model": "hfcompress.reference",
    "evaluate": "hfcompress.evaluate",
    "EvalResult": "hfcompress.evaluate",
    "QuantizationConfig": "hfcompress.quantize.config",
    "quantize": "hfcompress.quantize.api",
    "load_compressed": "hfcompress.quantize.runtime",
    "save_checkpoint": "hfcompress.quantize.saving",
    "verify_checkpoint": "hfcompress.quantize.verify",
    "DistillationConfig": "hfcompress.distill.config",
    "DistillationTrainer": "hfcompress.distill.trainer",
    "make_student": "hfcompress.distill.student",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hfcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def _public_function(name: str) -> property:
    """``hfcompress.quantize`` / ``hfcompress.evaluate`` are public functions *and* subpackage names.

    The import system assigns a subpackage to its parent's attribute when it is first imported, which would
    replace the function. These names are properties instead: reading always gives the function, and the
    import system's assignment is ignored (the subpackage stays reachable through ``sys.modules`` and
    ``from hfcompress.quantize.config import ...``).
    """

    def get(module):
        return getattr(importlib.import_module(_EXPORTS[name]), name)

    def set_(module, value):
        if not isinstance(value, types.ModuleType):
            raise AttributeError(f"hfcompress.{name} is read-only")

    return property(get, set_)


class _Package(types.ModuleType):
    quantize = _public_function("quantize")
    evaluate = _public_function("evaluate")


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .data import load_blocks, load_stdlib_corpus, load_texts, pack_blocks
    from .distill.config import DistillationConfig
    from .distill.student import make_student
    from .distill.trainer import DistillationTrainer
    from .errors import HFCompressError
    from .evaluate import EvalResult, evaluate
    from .quantize.api import quantize
    from .quantize.config import QuantizationConfig
    from .quantize.runtime import load_compressed
    from .quantize.saving import save_checkpoint
    from .quantize.verify import verify_checkpoint
    from .reference import reference_model
