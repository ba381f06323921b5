"""hfcompress's own CPU kernels, compiled on first use.

* ``hfcompress::int8_gemv`` (``csrc/int8_gemv.cpp``), for int8 decode. PyTorch's
  ``aten._weight_int8pack_mm`` is compute-bound at batch 1 on CPU (about 1.2-1.8x the float32 GEMV per
  weight), so int8 decode cannot get near the memory-bandwidth floor with it. Ours streams the int8 weights
  with the best of AVX-512 VNNI (exact integer dot products against a fixed-point form of the activations,
  64 weights per instruction), AVX-512 or AVX2 (float32 FMA), chosen at run time, and splits rows over ATen's
  OpenMP threads. Accuracy: float32-level (see the source's header for the bound).
* ``hfcompress::kd_logit_loss`` (``csrc/kd_loss.cpp``), for distillation: forward/reverse KL, generalized
  JSD and cross-entropy of a chunk of logits, and their gradient, in three or four sweeps over each row
  instead of eager PyTorch's ten or so passes over the whole chunk.

The sources are compiled into one extension with ``torch.utils.cpp_extension`` the first time one is needed
(a C++ compiler and ninja are required; the build takes about a minute and is cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). When it cannot be built, or
``HFCOMPRESS_NATIVE_KERNELS=0`` is set, callers fall back to PyTorch's operators with one warning, and
results stay correct.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("int8_gemv.cpp", "kd_loss.cpp")]
OPS = ("int8_gemv", "kd_logit_loss")
_ENV_SWITCH = "HFCOMPRESS_NATIVE_KERNELS"
# at::parallel_for is an OpenMP pragma inlined from ATen's headers: without -fopenmp it runs on one thread.
# The extension then links libgomp.so.1, which resolves to the copy torch already loaded.
_CFLAGS = ["-O3", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str


def _disabled_by_env() -> bool:
    return os.environ.get(_ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}


def _already_registered() -> bool:
    for name in OPS:
        try:
            getattr(torch.ops.hfcompress, name)
        except (AttributeError, RuntimeError):
            return False
    return True


def _build() -> None:
    from torch.utils import cpp_extension

    contents = b"".join(source.read_bytes() for source in _SOURCES)
    digest = hashlib.sha256(contents + " ".join(_CFLAGS).encode()).hexdigest()[:10]
    cpp_extension.load(
        # The digest in the name keeps builds of different sources or flags apart in a shared extensions folder.
        name=f"hfcompress_kernels_{digest}",
        sources=[str(source) for source in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def kernels_available() -> bool:
    """True when hfcompress's native operators (:data:`OPS`) can be called, building them on first use."""
    if _disabled_by_env():
        return False
    if "loaded" in _state:
        return bool(_state["loaded"])
    with _lock:
        if "loaded" not in _state:
            try:
                if not _already_registered():
                    logger.info("building hfcompress's CPU kernels (first use; cached afterwards)")
                    _build()
                _register_fake()
                _state["loaded"] = True
            except Exception as error:  # no compiler, no ninja, read-only cache...: fall back, say why once
                _state["loaded"] = False
                _state["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                logger.warning(
                    "hfcompress's CPU kernels could not be built (%s); using PyTorch's operators instead "
                    "(int8 decode through _weight_int8pack_mm, slower at batch 1; distillation losses through "
                    "eager softmax/KL, slower per step). Install a C++ compiler and ninja to get them, or set "
                    "%s=0 to silence this.", _state["error"], _ENV_SWITCH)
    return bool(_state["loaded"])


# Both operators come from the one extension: these names say which one a caller needs.
int8_gemv_available = kernels_available
kd_logit_loss_available = kernels_available


def native_kernel_status() -> dict:
    """What the native kernels are doing, for reports: {"int8_gemv": "loaded" | reason, "kd_logit_loss": ...}."""
    if _disabled_by_env():
        state = f"disabled by {_ENV_SWITCH}"
    else:
        state = "loaded" if kernels_available() else f"unavailable ({_state.get('error')})"
    return {name: state for name in OPS}


def _register_fake() -> None:
    """Shape function so the op traces under ``torch.compile`` / meta tensors."""
    if _state.get("fake_registered"):
        return
    try:
        @torch.library.register_fake("hfcompress::int8_gemv")
        def _(x, q, scale, isa=-1):
            return x.new_empty((x.shape[0], q.shape[0]))

        @torch.library.register_fake("hfcompress::kd_logit_loss")
        def _(student_logits, teacher_logits, targets, kind, temperature, kd_weight, ce_weight, need_grad, beta=0.5):
            rows = student_logits.shape[0]
            return student_logits.new_empty((rows,)), student_logits.new_empty((rows,))
    except RuntimeError:  # already registered in this process (e.g. by a second import path)
        pass
    _state["fake_registered"] = True


def int8_gemv_op():
    """The operator's overload (``torch.ops.hfcompress.int8_gemv.default``), looked up once: the
    ``torch.ops`` attribute chain costs microseconds per call, which decode pays ~100 times per token.
    Call only when :func:`int8_gemv_available` is True."""
    op = _state.get("op")
    if op is None:
        op = _state["op"] = torch.ops.hfcompress.int8_gemv.default
    return op


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, isa: int = -1) -> torch.Tensor:
    """``x (M, K) @ (q (N, K) * scale (N,)[:, None]).T`` in x's dtype (float32 or bfloat16), float32 sums.

    ``isa`` picks the code path (-1: the best the CPU has; 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI),
    for tests.
    Call only when :func:`int8_gemv_available` is True.
    """
    return int8_gemv_op()(x, q, scale, isa)


# Divergences the fused loss kernel computes, by DistillationConfig.loss name; "none" = cross-entropy only.
KD_KINDS = {"forward_kl": 0, "reverse_kl": 1, "none": 2, "jsd": 3}


def kd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                  loss: str, temperature: float, kd_weight: float, ce_weight: float,
                  need_grad: bool, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(T² D(p_T ‖ q_T), CE(q_1, target))`` of contiguous float32 CPU logits (rows, V).

    ``loss`` is ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (generalized, normalised as
    :func:`hfcompress.distillation.losses.generalized_jsd`; ``0 < beta < 1``) or ``"none"`` (no teacher). With ``need_grad``,
    ``student_logits`` is overwritten with the gradient of ``sum(kd_weight · kd + ce_weight · ce)`` w.r.t.
    itself. Call only when :func:`kd_logit_loss_available` is True.
    """
    op = _state.get("kd_op")
    if op is None:
        op = _state["kd_op"] = torch.ops.hfcompress.kd_logit_loss.default
    return op(student_logits, teacher_logits, targets, KD_KINDS[loss], float(temperature), float(kd_weight),
              float(ce_weight), bool(need_grad), float(beta))
