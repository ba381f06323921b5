"""Atomic, sharded checkpoint saving: everything hfcompress writes goes through ``save_checkpoint``.

The model is written with its own ``save_pretrained`` (so quantized models use their format's serialization:
compressed-tensors, bitsandbytes) into a staging folder beside the destination, checked with
:func:`verify_checkpoint`, hashed into ``hfcompress-manifest.json`` and only then renamed into place
(:func:`hfcompress.core.atomic.atomic_folder`). A failure or a kill at any step leaves an existing destination
untouched; readers never see a half-written checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.atomic import CheckpointExistsError, atomic_folder, check_destination
from ..core.errors import HFCompressError
from .packed import SAVE_PACKED_HINT, packed_modules

__all__ = ["CheckpointExistsError", "save_checkpoint"]

logger = logging.getLogger(__name__)


def _check_bnb_cpu_repacked(model) -> None:
    """bitsandbytes 0.50 cannot save a CPU 4-bit layer exactly once its first forward repacked it (see
    :func:`hfcompress.quantization.bnb._keep_4bit_serializable`); refuse instead of writing a corrupted file."""
    named_modules = getattr(model, "named_modules", None)
    for name, module in named_modules() if callable(named_modules) else ():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise HFCompressError(
                f"cannot save: bitsandbytes repacked layer {name!r} for its CPU kernel during a forward pass and "
                "cannot write it back exactly (bitsandbytes 0.50); save before running the model, or quantize "
                "with hfcompress.quantize (which keeps layers serializable)")


def _check_not_packed(model) -> None:
    """A model on the packed runtime holds kernel layouts, not checkpoint tensors: refuse before writing."""
    names = packed_modules(model) if hasattr(model, "named_modules") else []
    if names:
        raise HFCompressError(f"cannot save: {names[0]!r} ({len(names)} modules) is a packed runtime module "
                              f"(inference only); {SAVE_PACKED_HINT}")


def _write_extra_files(folder: Path, extra_files: dict[str, str | bytes]) -> None:
    for name, content in extra_files.items():
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise HFCompressError(f"extra file name {name!r} must be a relative path inside the checkpoint folder")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def save_checkpoint(model, out_dir: str | os.PathLike, tokenizer=None, max_shard_size: int | str = "2GB",
                    overwrite: bool = False, extra_files: dict[str, str | bytes] | None = None,
                    verify: bool = True) -> Path:
    """Save ``model`` (and ``tokenizer``, ``extra_files``) to ``out_dir`` atomically; return its path.

    Args:
        model: a transformers ``PreTrainedModel`` (plain, compressed-tensors or bitsandbytes quantized).
        out_dir: the destination folder; created, or replaced when ``overwrite=True``.
        tokenizer: saved alongside when given.
        max_shard_size: passed to ``save_pretrained`` ("2GB", "500MB" or bytes); larger models are split into
            ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
        overwrite: replace a non-empty ``out_dir``; otherwise a non-empty folder raises
            :class:`CheckpointExistsError`.
        extra_files: ``{relative name: text or bytes}`` written into the folder (model card, recipe, ...).
        verify: run :func:`hfcompress.quantization.verify.verify_checkpoint` (headers, expected tensors, scales)
            on the written folder before it is moved into place.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_destination(out_dir, overwrite)
    _check_bnb_cpu_repacked(model)
    _check_not_packed(model)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra_files:
            _write_extra_files(tmp, extra_files)
        if verify:
            from .verify import verify_checkpoint

            report = verify_checkpoint(tmp, deep=False)
            if not report.ok:
                raise HFCompressError(f"the checkpoint written for {out_dir.name!r} failed verification: "
                                      f"{report.problems[0]} ({len(report.problems)} problems)")
    logger.info("saved checkpoint to %s", out_dir)
    return out_dir
