"""scripts/distill.py under `accelerate launch` with 2 processes (on CPU: 2 ranks over gloo, MULTI_CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, tiny_reference_dir, distill_text_file):
    output = tmp_path / "student"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "distill.py"),
        "--teacher", str(tiny_reference_dir), "--student_num_layers", "1", "--student_hidden_size", "32",
        "--dataset", str(distill_text_file), "--block_size", "32", "--num_train_blocks", "32",
        "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--save_steps", "3", "--logging_steps", "1", "--hidden_weight", "1.0", "--learning_rate", "3e-3",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"student saved to {output}" in done.stdout

    # Both ranks ran in one gloo group, with per-loss components logged.
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "kd_loss" in entry]
    assert len(logged) == 3 and all("hidden_loss" in entry and "ce_loss" in entry for entry in logged)
    assert {p.name for p in (output / "checkpoint-3").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                 "rng_state_1.pth"}
    # The student is a plain checkpoint; the projections (32 -> 64) are saved beside it in the checkpoint.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(output)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (1, 32)
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        assert not any("maps." in key for key in handle.keys())
    assert (output / "checkpoint-3" / "hidden_projections.safetensors").is_file()
