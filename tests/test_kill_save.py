"""Nothing lost: saves killed with SIGKILL at random moments and at chosen points leave the previous complete
output or none, never a folder that loads but is broken.

One worker process (tests/kill_worker.py) imports everything once and forks a saver per trial, so the 31
trials cost seconds, not 40 interpreter start-ups. Each trial's outcome is counted here; every one must be
"previous", "complete" or "absent" (see the worker's docstring for how each is decided).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a saver per trial (POSIX only)")

GOOD = {"previous", "complete", "absent"}


@pytest.fixture(scope="module")
def outcomes(tiny_reference_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("kill")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_worker.py"), str(tiny_reference_dir),
                           str(work), "0"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kill_leaves_previous_or_nothing(outcomes):
    counts = collections.Counter(o for trials in outcomes.values() for o in trials)
    print("kill outcomes:", dict(counts), {k: collections.Counter(v) for k, v in outcomes.items()})
    assert sum(counts.values()) >= 20
    bad = {scenario: [o for o in trials if o.split("+")[0] not in GOOD]
           for scenario, trials in outcomes.items()}
    assert not any(bad.values()), bad


def test_injected_points_leave_the_previous_save(outcomes):
    # Killed after everything but the rename was written: the previous save is what loads.
    for scenario in ("tokenizer-save", "before-rename"):
        assert outcomes[scenario] == ["previous", "previous"], scenario
    # Killed between moving the old folder aside and moving the new one in (no renameat2): nothing at the
    # target, and the next save to it puts the previous one back.
    assert outcomes["swap-interrupted"] == ["absent+restored:previous"] * 2
    # The final Trainer save killed after a few file moves: no config.json, so nothing loads a mix.
    assert outcomes["distill-save_model-mid-move"] == ["absent"] * 3


def test_random_kills_are_all_counted(outcomes):
    """Random delays over whole saves: the kill lands before the rename (previous) or after it (complete)."""
    assert set(outcomes["quantize-random"]) <= {"previous", "complete"} and len(outcomes["quantize-random"]) == 10
    assert set(outcomes["distill-checkpoint"]) <= {"complete", "absent"} and len(outcomes["distill-checkpoint"]) == 4
    assert len(outcomes["distill-save_model-random"]) == 4 and len(outcomes["recipe-stage"]) == 4
