"""hfcompress: distill and quantize Hugging Face Transformers models into small, Hub-ready checkpoints.

The public API is imported lazily so that ``import hfcompress`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "HFCompressError": "hfcompress.core.errors",
    "load_texts": "hfcompress.core.data",
    "load_blocks": "hfcompress.core.data",
    "pack_blocks": "hfcompress.core.data",
    "load_stdlib_corpus": "hfcompress.core.data",
    "reference_model": "hfcompress.models.reference",
    "evaluate": "hfcompress.models.evaluate",
    "EvalResult": "hfcompress.models.evaluate",
    "QuantizationConfig": "hfcompress.quantization.config",
    "quantize": "hfcompress.quantization.api",
    "quantize_checkpoint": "hfcompress.quantization.streaming",
    "prepare_qat": "hfcompress.quantization.qat",
    "convert_qat": "hfcompress.quantization.qat",
    "load_compressed": "hfcompress.quantization.runtime",
    "HFCompressConfig": "hfcompress.quantization.hf_quantizer",
    "save_checkpoint": "hfcompress.quantization.saving",
    "verify_checkpoint": "hfcompress.quantization.verify",
    "DistillationConfig": "hfcompress.distillation.config",
    "DistillationTrainer": "hfcompress.distillation.trainer",
    "make_student": "hfcompress.distillation.student",
    "truncate": "hfcompress.distillation.modes",
    "write_teacher_cache": "hfcompress.distillation.cache",
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


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .core.data import load_blocks, load_stdlib_corpus, load_texts, pack_blocks
    from .distillation.config import DistillationConfig
    from .distillation.cache import write_teacher_cache
    from .distillation.modes import truncate
    from .distillation.student import make_student
    from .distillation.trainer import DistillationTrainer
    from .core.errors import HFCompressError
    from .models.evaluate import EvalResult, evaluate
    from .quantization.api import quantize
    from .quantization.config import QuantizationConfig
    from .quantization.qat import convert_qat, prepare_qat
    from .quantization.streaming import quantize_checkpoint
    from .quantization.runtime import load_compressed
    from .quantization.hf_quantizer import HFCompressConfig
    from .quantization.saving import save_checkpoint
    from .quantization.verify import verify_checkpoint
    from .models.reference import reference_model
