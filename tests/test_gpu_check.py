"""scripts/gpu_check.py / gpu_check.sh, in their CPU dry run: every step runs on tiny sizes, a failed step is
recorded with its error and the rest goes on, and the shell wrapper writes its report into $OUT."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.setenv("HFCOMPRESS_NATIVE_KERNELS", "0")  # no C++ build inside the test
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_step(tmp_path, gpu_check):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == [name for name, *_ in gpu_check.STEPS]
    assert steps["pytest"]["status"] == "skipped"
    assert all(record["status"] == "ok" for name, record in steps.items() if name != "pytest"), steps
    runtime = steps["runtime"]
    # the packed model reproduces the dequantized one far more closely than GPTQ reproduces the original
    assert runtime["packed_vs_dequantized"]["relative_l2"] < 0.1 * runtime["dequantized_vs_original"]["relative_l2"]
    assert runtime["packed_speed"]["decode_tokens_per_s"] > 0
    assert steps["gptq"]["mean_relative_output_error_gptq"] < steps["gptq"]["mean_relative_output_error_rtn"]
    assert len(steps["distill"]["logged (step, loss, kd, ce, hidden)"]) >= 1
    assert "| runtime | ok |" in (tmp_path / "gpu_check.md").read_text()
    compiled = steps["compile"]  # Dynamo's eager backend in the dry run: the tracing and static cache, no Inductor
    assert compiled["compiled_decode"] == "compiled" and compiled["same_tokens_as_eager"]


def test_a_failed_step_is_recorded_and_the_run_goes_on(tmp_path, gpu_check, monkeypatch):
    def broken(run):
        raise RuntimeError("no model today")

    steps = [(name, broken if name == "model" else fn, needs) for name, fn, needs in gpu_check.STEPS]
    monkeypatch.setattr(gpu_check, "STEPS", tuple(steps))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "env,model,gptq,runtime,kernels"]) == 1
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["model"]["status"] == "failed" and steps["model"]["error"] == "RuntimeError: no model today"
    assert "raise RuntimeError" in "\n".join(steps["model"]["traceback"])
    assert steps["gptq"]["status"] == steps["runtime"]["status"] == "skipped"
    assert "model" in steps["gptq"]["reason"] and "gptq" in steps["runtime"]["reason"]
    assert steps["env"]["status"] == steps["kernels"]["status"] == "ok"


def test_shell_wrapper_writes_into_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "HFCOMPRESS_GPU_CHECK_DRY": "1",
           "HFCOMPRESS_NATIVE_KERNELS": "0"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--steps", "env"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["steps"]["env"]["wheel_install"].startswith("dry run")
    assert (tmp_path / "out" / "gpu_check.log").read_text().strip()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
def test_without_a_gpu_the_report_says_so(tmp_path, gpu_check, monkeypatch):
    monkeypatch.delenv("HFCOMPRESS_GPU_CHECK_DRY", raising=False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["env"]["status"] == "ok" and "is_available() is False" in steps["gpu"]["error"]
