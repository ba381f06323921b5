"""`hfcompress reference` killed mid-training: no cache is ever taken as finished, and the next call resumes
from the last saved state to the same teacher an uninterrupted training gives."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hfcompress.core.manifest import check_manifest
from hfcompress.models import reference

STEPS, EVERY, KILL_AT = 12, 4, 10  # states saved after steps 4 and 8; killed inside step 10



def small_corpus():
    """A few stdlib packages instead of the whole library: the tokenizer trains in a fraction of a second."""
    import email
    import json

    files = sorted(Path(email.__file__).parent.glob("*.py")) + sorted(Path(json.__file__).parent.glob("*.py"))
    texts = [path.read_text() for path in files]
    return {"train": {"text": texts[:-4]}, "validation": {"text": texts[-4:]}}


CHILD = """
import os, torch, dataclasses
from hfcompress.models import reference
from tests.test_reference_resume import small_corpus
reference.load_stdlib_corpus = small_corpus
reference.REFERENCE_SPECS["tiny"] = dataclasses.replace(reference.REFERENCE_SPECS["tiny"], steps={steps})
reference.RESUME_EVERY = {every}
clip, calls = torch.nn.utils.clip_grad_norm_, []
def clip_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), 9)
    return clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip_then_die
reference.reference_model("tiny", progress=False)
"""


def test_killed_reference_training_resumes_to_the_same_teacher(tmp_path, monkeypatch, caplog):
    home = tmp_path / "home"
    env = {**os.environ, "HFCOMPRESS_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(steps=STEPS, every=EVERY, kill_at=KILL_AT)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]

    monkeypatch.setenv("HFCOMPRESS_HOME", str(home))
    monkeypatch.setitem(reference.REFERENCE_SPECS, "tiny",
                        dataclasses.replace(reference.REFERENCE_SPECS["tiny"], steps=STEPS))
    monkeypatch.setattr(reference, "RESUME_EVERY", EVERY)
    monkeypatch.setattr(reference, "load_stdlib_corpus", small_corpus)
    target = reference.reference_path("tiny")
    assert not target.exists()  # nothing that could be taken for a finished cache
    assert reference.reference_metrics("tiny") == {}

    with caplog.at_level(logging.WARNING, logger="hfcompress.models.reference"):
        assert reference.reference_model("tiny", progress=False) == target
    assert f"resuming the interrupted training of reference 'tiny' at step 8 of {STEPS}" in caplog.text
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # staging and state cleaned up
    assert check_manifest(target).has_manifest and not check_manifest(target).problems

    # The same training, never interrupted. Identical float32 ops on the restored state: equal up to the
    # reassociation noise a tolerance of 1e-6 allows; a wrong data order or lost Adam moments moves every
    # weight by about the learning rate (2e-3 .. 3e-3).
    reference.train_reference("tiny", tmp_path / "uninterrupted", progress=False)
    resumed = load_file(str(target / "model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "uninterrupted" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-6, atol=1e-6, msg=name)
