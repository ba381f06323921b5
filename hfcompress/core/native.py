"""hfcompress's own CPU kernels, compiled on first use.

* ``hfcompress::int8_gemv`` (``csrc/int8_gemv.cpp``), for int8 decode. PyTorch's
  ``aten._weight_int8pack_mm`` is compute-bound at batch 1 on CPU (about 1.2-1.8x the float32 GEMV per
  weight), so int8 decode cannot get near the memory-bandwidth floor with it. Ours streams the int8 weights
  with the best of AVX-512 VNNI (exact integer dot products against a fixed-point form of the activations,
  64 weights per instruction), AVX-512 or AVX2 (float32 FMA), chosen at run time, and splits rows over ATen's
  OpenMP threads. Accuracy: float32-level (see the source's header for the bound).
* ``hfcompress::int4_gemv`` / ``int4_pack`` (``csrc/int4_gemv.cpp``), for group-wise int4 weights
  (compressed-tensors' W4A16, symmetric or with a zero point), repacked at load into a layout made for it.
  Decode quantizes each activation row to int8 in blocks of 32 and takes exact integer dot products
  (AVX-512 VNNI ``vpdpbusd`` or AVX2 ``vpmaddubsw``) with one float scale per block and weight group.
* Both weight kernels, given many activation rows (prefill), dequantize tiles of weight rows to float32 and
  multiply them with ATen's GEMM, so packed models prefill at float32 GEMM speed.
* ``hfcompress::decode_attention`` (``csrc/decode_attention.cpp``), a decode step's attention: one query token
  per head over the KV cache, grouped K/V heads read in place, masked positions skipped (AVX2 + FMA or portable
  loops). A library GEMM or flash-attention call costs more in setup than this arithmetic at one query row.
* ``hfcompress::kd_logit_loss`` (``csrc/kd_loss.cpp``), for distillation: forward/reverse KL, generalized
  JSD and cross-entropy of a chunk of logits, and their gradient, in three or four sweeps over each row
  instead of eager PyTorch's ten or so passes over the whole chunk.

The sources are compiled into one extension with ``torch.utils.cpp_extension`` the first time one is needed
(a C++ compiler and ninja are required; the build takes about a minute and is cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). When it cannot be built, or
``HFCOMPRESS_NATIVE_KERNELS=0`` is set, callers fall back to PyTorch's operators with one warning, and
results stay correct.

Instruction sets: every kernel runs the widest path the CPU has (AVX-512 VNNI, AVX-512, AVX2 + FMA), or a
narrower one named by ``HFCOMPRESS_CPU_ISA`` (``avx512``, ``avx2`` or ``generic``), so an AVX-512 machine can
run and time the AVX2 code that many users' CPUs get. :func:`kernel_isa` says which path runs. On a CPU
without AVX2 (or with ``HFCOMPRESS_CPU_ISA=generic``) the weight kernels' portable loops would be slower than
PyTorch's own operators, so :func:`weight_kernels_available` is False there and the runtime falls back to
PyTorch's kernels, with one warning; the distillation loss keeps its baseline x86-64 build.

Prefill (8 or more activation rows) without native bfloat16 runs an integer GEMM (int16 activations per block,
exact integer products; csrc/common.h's ``i16_gemm``); ``HFCOMPRESS_PREFILL=float`` selects float32-accurate
dequantized tiles instead (read at each call).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("int8_gemv.cpp", "int4_gemv.cpp", "kd_loss.cpp", "decode_attention.cpp")]
_HEADERS = [_CSRC / "common.h"]
OPS = ("int8_gemv", "int4_gemv", "kd_logit_loss", "decode_attention")
_ENV_SWITCH = "HFCOMPRESS_NATIVE_KERNELS"
_ENV_ISA = "HFCOMPRESS_CPU_ISA"
# Instruction-set levels the kernels take (csrc/common.h): the names HFCOMPRESS_CPU_ISA accepts map to the
# widest level they allow.
ISA_LEVELS = {0: "generic", 1: "avx2", 2: "avx512", 3: "avx512-vnni"}
_ISA_CAPS = {"generic": 0, "avx2": 1, "avx512": 3}
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

    contents = b"".join(source.read_bytes() for source in _SOURCES + _HEADERS)
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


def cpu_isa() -> int:
    """The widest instruction-set level this CPU supports (a key of :data:`ISA_LEVELS`), by probing the kernel."""
    if "cpu_isa" not in _state:
        level = 0
        probe = torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int8), torch.ones(1)
        for candidate in (3, 2, 1):
            try:
                torch.ops.hfcompress.int8_gemv.default(*probe, candidate)
                level = candidate
                break
            except RuntimeError:
                continue
        _state["cpu_isa"] = level
    return int(_state["cpu_isa"])


def kernel_isa() -> int:
    """The instruction-set level the kernels run at: the CPU's best, capped by ``HFCOMPRESS_CPU_ISA``.
    Call only when :func:`kernels_available` is True."""
    requested = os.environ.get(_ENV_ISA, "").strip().lower()
    cached = _state.get("isa")
    if cached is not None and cached[0] == requested:
        return cached[1]
    if requested and requested not in _ISA_CAPS:
        from .errors import ConfigError

        raise ConfigError(f"{_ENV_ISA}={requested!r} is not an instruction set the kernels know; use one of "
                          f"{', '.join(_ISA_CAPS)} (or unset it for the widest this CPU has)")
    level = min(cpu_isa(), _ISA_CAPS.get(requested, 3))
    _state["isa"] = (requested, level)
    return level


def weight_kernels_available() -> bool:
    """True when the int8/int4 weight kernels should run: built, and with a vector path (AVX2 or wider)
    allowed by the CPU and ``HFCOMPRESS_CPU_ISA``. Otherwise PyTorch's kernels run (one warning, once)."""
    if not kernels_available():
        return False
    if kernel_isa() >= 1:
        return True
    if not _state.get("warned_generic"):
        _state["warned_generic"] = True
        reason = (f"{_ENV_ISA}=generic" if os.environ.get(_ENV_ISA, "").strip().lower() == "generic"
                  else "this CPU has no AVX2")
        logger.warning("hfcompress's int8/int4 CPU kernels need AVX2 (%s); packed layers use PyTorch's kernels "
                       "instead (int8 through _weight_int8pack_mm, int4 through _weight_int4pack_mm_for_cpu)",
                       reason)
    return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX) and ``HFCOMPRESS_CPU_ISA`` allows
    AVX-512. Elsewhere (AVX2 CPUs) bfloat16 arithmetic is emulated, several times slower than float32."""
    if "bf16" not in _state:
        flags = set()
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _state["bf16"] = bool(flags & {"avx512_bf16", "amx_bf16"})
    requested = os.environ.get(_ENV_ISA, "").strip().lower()
    return bool(_state["bf16"]) and _ISA_CAPS.get(requested, 3) >= 2


# The operators come from the one extension: these names say which one a caller needs.
int8_gemv_available = weight_kernels_available
int4_gemv_available = weight_kernels_available
kd_logit_loss_available = kernels_available


def native_kernel_status() -> dict:
    """What the native kernels are doing, for reports: {"int8_gemv": "loaded (avx2)" | reason, ...}."""
    if _disabled_by_env():
        return {name: f"disabled by {_ENV_SWITCH}" for name in OPS}
    if not kernels_available():
        return {name: f"unavailable ({_state.get('error')})" for name in OPS}
    isa = ISA_LEVELS[kernel_isa()]
    weights = (f"loaded ({isa})" if weight_kernels_available()
               else f"not used: needs AVX2, running {isa} (PyTorch's kernels instead)")
    # The loss kernel's clones: AVX-512, AVX2 + FMA, or baseline x86-64 ("generic").
    loss = "avx512" if isa.startswith("avx512") else isa
    attention = f"loaded ({'generic' if kernel_isa() == 0 else 'avx2'})"
    return {"int8_gemv": weights, "int4_gemv": weights, "kd_logit_loss": f"loaded ({loss})",
            "decode_attention": attention}


def _register_fake() -> None:
    """Shape function so the op traces under ``torch.compile`` / meta tensors."""
    if _state.get("fake_registered"):
        return
    try:
        @torch.library.register_fake("hfcompress::int8_gemv")
        def _(x, q, scale, isa=-1):
            return x.new_empty((x.shape[0], q.shape[0]))

        @torch.library.register_fake("hfcompress::int4_gemv")
        def _(x, packed, scale, offset, out_features, group_size, isa=-1):
            return x.new_empty((x.shape[0], out_features))

        @torch.library.register_fake("hfcompress::kd_logit_loss")
        def _(student_logits, teacher_logits, targets, kind, temperature, kd_weight, ce_weight, need_grad, beta=0.5,
              isa=-1):
            rows = student_logits.shape[0]
            return student_logits.new_empty((rows,)), student_logits.new_empty((rows,))

        @torch.library.register_fake("hfcompress::decode_attention")
        def _(query, key, value, mask, scale, isa=-1):
            return query.new_empty((query.shape[0], query.shape[1], value.shape[3]))
    except RuntimeError:  # already registered in this process (e.g. by a second import path)
        pass
    _state["fake_registered"] = True


def int8_gemv_op():
    """The operator's overload (``torch.ops.hfcompress.int8_gemv.default``), looked up once: the
    ``torch.ops`` attribute chain costs microseconds per call, which decode pays ~100 times per token.
    Call only when :func:`int8_gemv_available` is True."""
    return _op("int8_gemv")


def _op(name: str):
    """``torch.ops.hfcompress.<name>.default``, looked up once per process."""
    ops = _state.setdefault("ops", {})
    op = ops.get(name)
    if op is None:
        op = ops[name] = getattr(torch.ops.hfcompress, name).default
    return op


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, isa: int = -1) -> torch.Tensor:
    """``x (M, K) @ (q (N, K) * scale (N,)[:, None]).T`` in x's dtype (float32 or bfloat16), float32 sums.

    ``isa`` picks the code path (-1: :func:`kernel_isa`; 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI).
    Many rows (prefill) go through float32 tiles and ATen's GEMM. Call only when the kernels are available.
    """
    return int8_gemv_op()(x, q, scale, kernel_isa() if isa < 0 else isa)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes q (N, K) int8 in [-8, 7] -> the int4 kernel's layout, uint8 (ceil(N/4), ceil(K/64),
    4, 32) (see csrc/int4_gemv.cpp)."""
    return torch.ops.hfcompress.int4_pack.default(q)


def int4_gemv_op():
    """The int4 operator's overload, looked up once (see :func:`int8_gemv_op`)."""
    return _op("int4_gemv")


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
              out_features: int, group_size: int, isa: int = -1) -> torch.Tensor:
    """``x (M, K) @ W.T`` for ``W[n, k] = (u - c) s`` with the packed codes u (:func:`int4_pack` of q = u - 8),
    ``scale`` s float32 (N, G) and ``offset`` = c s float32 (N, G), or None for c = 8 (symmetric); groups of
    ``group_size`` along K (a multiple of 32, or >= K for one scale per row). x float32 or bfloat16; output in
    x's dtype. ``isa`` as for :func:`int8_gemv` (2 runs the AVX2 code). Call only when the kernels are available.
    """
    return int4_gemv_op()(x, packed, scale, offset, out_features, group_size, kernel_isa() if isa < 0 else isa)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, isa: int = -1) -> torch.Tensor:
    """One query token per head over a KV cache, grouped K/V heads read in place (csrc/decode_attention.cpp):
    query (B, H, D), key (B, KVH, L, D), value (B, KVH, L, Dv), mask None, bool (B, L) (True = attend) or float
    (B, L) added to the scores -> (B, H, Dv) in query's dtype (float32, bfloat16 or float64); query head h reads
    K/V head h // (H / KVH). ``isa`` as for :func:`int8_gemv` (1 and up run the AVX2 code). Call only when
    :func:`kernels_available` is True."""
    return _op("decode_attention")(query, key, value, mask, scale, kernel_isa() if isa < 0 else isa)


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
              float(ce_weight), bool(need_grad), float(beta), kernel_isa())
