"""A quantization that fails half-way never leaves a half-quantized model that saves quietly.

:func:`hfcompress.quantize` changes the model in place, layer by layer: it swaps linears for quantized
modules and, for some methods, edits float tensors first (GPTQ's one pass writes each linear's dequantized
weight into it; AWQ folds scales into linears and norms). :class:`Rollback` is the undo log of those changes:

* ``keep=True``: the original modules and a copy of every tensor edited in place are held until the end; on
  an error everything is put back, so the model is exactly the float model it was. The price is the memory
  of the quantized weights on top of the float model until quantization finishes (the float weights are
  not freed as layers are replaced); :func:`choose_keep` takes this only when it fits comfortably.
* ``keep=False`` (memory too tight to hold both): nothing is held; on an error the model is *marked*: its
  ``state_dict`` (hence ``save_pretrained``, ``save_checkpoint``, ``push_to_hub``) raises, naming the failure,
  and ``model.hfcompress_incomplete`` holds the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import HFCompressError

logger = logging.getLogger(__name__)

MEMORY_FRACTION = 0.5  # of the free memory that holding the originals until the end may take


class IncompleteQuantizationError(HFCompressError):
    """A model whose quantization failed half-way (and could not be restored) was asked to be saved."""


def choose_keep(model: nn.Module, extra_bytes: int) -> bool:
    """Whether holding the original layers until quantization ends (``extra_bytes`` more than freeing them
    as they are replaced) fits in :data:`MEMORY_FRACTION` of the free memory of the model's device."""
    from .sequential import free_bytes

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        free = free_bytes(device)
    except Exception:  # no way to tell: keep (the safe choice for the model)
        return True
    if extra_bytes <= MEMORY_FRACTION * free:
        return True
    logger.warning("not keeping the original layers for a rollback (~%.1f GiB more than %d%% of the %.1f GiB "
                   "free): if quantization fails half-way, the model is marked unsaveable instead of restored",
                   extra_bytes / 2**30, int(MEMORY_FRACTION * 100), free / 2**30)
    return False


class Rollback:
    """Undo log of one :func:`~hfcompress.quantize` call (see the module docstring). Use as a context
    manager around the changes; :meth:`commit` when they all succeeded."""

    def __init__(self, model: nn.Module, keep: bool = True):
        self.model, self.keep = model, keep
        self.modules: list[tuple[str, nn.Module]] = []  # (name, original module), in replacement order
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its original data)
        self.cleanups: list[Callable[[], None]] = []
        self.done: list[str] = []  # names of the layers replaced so far (for the message)

    # ---- recording ----------------------------------------------------------------------------------
    def modified(self, *tensors: torch.Tensor) -> None:
        """About to edit ``tensors`` in place: keep their original values (once)."""
        if not self.keep:
            return
        for tensor in tensors:
            if id(tensor) not in self.tensors:
                self.tensors[id(tensor)] = (tensor, tensor.data.clone())

    def replaced(self, name: str, original: nn.Module) -> None:
        """``original`` was just swapped out of the model at ``name``. Its tensors edited in place get their
        original values back now (the edited copies are no longer used), so the module held is the original."""
        self.done.append(name)
        for tensor in list(original.parameters()) + list(original.buffers()):
            saved = self.tensors.pop(id(tensor), None)
            if saved is not None:
                tensor.data = saved[1]
        if self.keep:
            self.modules.append((name, original))

    def on_undo(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (e.g. remove a config attribute set meanwhile) when rolling back."""
        self.cleanups.append(cleanup)

    # ---- outcome ------------------------------------------------------------------------------------
    def commit(self) -> None:
        self.modules.clear()
        self.tensors.clear()
        self.cleanups.clear()

    def undo(self) -> None:
        for name, original in reversed(self.modules):
            self.model.set_submodule(name, original)
        for tensor, data in self.tensors.values():
            tensor.data = data
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.commit()

    def mark(self, reason: str) -> None:
        mark_incomplete(self.model, reason)

    def __enter__(self) -> "Rollback":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            return False
        what = f"{type(error).__name__}: {error}".splitlines()[0]
        if self.keep:
            try:
                self.undo()
                logger.info("quantization failed (%s); the model's original weights were restored", what)
                return False
            except Exception:  # pragma: no cover - a failure while undoing: fall back to marking
                logger.exception("restoring the original weights failed")
        done = f"after {len(self.done)} layer(s) were replaced (last: {self.done[-1]})" if self.done else \
            "before any layer was replaced, but after some weights were changed in place"
        self.mark(f"quantization failed {done} ({what}); the model is half-quantized: load the original "
                  f"model again")
        return False


def mark_incomplete(model: nn.Module, reason: str) -> None:
    """Make ``model.state_dict()`` (which ``save_pretrained`` and :func:`save_checkpoint` call) raise
    :class:`IncompleteQuantizationError` with ``reason``; ``model.hfcompress_incomplete`` is the reason."""
    model.hfcompress_incomplete = reason
    if getattr(model, "_hfcompress_refuse_handle", None) is None:
        def refuse(module, prefix, keep_vars):
            raise IncompleteQuantizationError(f"refusing to save {type(module).__name__}: "
                                              f"{module.hfcompress_incomplete}")

        model._hfcompress_refuse_handle = model.register_state_dict_pre_hook(refuse)
