"""Which device to run on, checked once with a one-line error instead of a CUDA traceback deep inside a kernel.

``resolve_device("cuda")`` on a machine whose PyTorch has no CUDA (or sees no GPU) raises
:class:`~hfcompress.core.errors.ConfigError` naming what is missing and how to fix it; ``"auto"`` picks the first
GPU when there is one, else the CPU. Also the two measurements that differ between host and GPU: waiting for
queued kernels before reading a clock, and the peak memory of a run.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch

from .errors import ConfigError

DEVICE_HELP = "use device='cpu', 'cuda', 'cuda:N' or 'auto'"


def resolve_device(device: str | torch.device | None, default: str = "cpu") -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` -> ``default``)."""
    if device is None:
        device = default
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; {DEVICE_HELP}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            reason = (f"this PyTorch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                      else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise ConfigError(f"device {str(device)!r} was requested but {reason}; use device='cpu' (or 'auto'), "
                              "or install a CUDA build of PyTorch on a machine with a GPU")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {str(device)!r} does not exist: {count} CUDA device(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {str(device)!r} was requested but MPS is not available; {DEVICE_HELP}")
    elif resolved.type not in ("cpu", "meta", "xpu"):
        raise ConfigError(f"unsupported device {str(device)!r}; {DEVICE_HELP}")
    return resolved


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (GPU work is asynchronous: a clock read without this measures
    only how fast Python queued them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes the caching allocator handed out on a GPU since the last :func:`reset_peak_memory`
    (``torch.cuda.max_memory_allocated``); None for the CPU, whose peak is the process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: Linux's ``VmHWM`` (``ru_maxrss`` would carry a parent's
    peak across fork + exec), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
