"""Resume, NaN and the caller's objects: a run killed mid-training resumes to the uninterrupted result; a
non-finite loss stops training with the step named and saves nothing; the caller's teacher stays usable."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hfcompress import DistillationConfig, DistillationTrainer, make_student
from hfcompress.core.data import BlockDataset
from hfcompress.core.errors import ConfigError
from hfcompress.distillation.trainer import NonFiniteLossError

STEPS, SAVE_EVERY, KILL_AT = 6, 2, 3  # killed inside step 4: the last checkpoint is checkpoint-2


def _blocks(tokenizer):
    from hfcompress.core.data import load_stdlib_corpus, pack_blocks

    return pack_blocks(load_stdlib_corpus()["validation"]["text"][:8], tokenizer, block_size=32)[:24]


class _KillAt(TrainerCallback):
    """SIGKILLs its own process when step ``step + 1`` begins: no cleanup, no final save, as on a crash."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), 9)


def build(teacher_dir, output, kill_at=None) -> DistillationTrainer:
    """A run whose result depends on everything a resume must restore: dropout (RNG), a warmup + cosine
    schedule (scheduler), Adam moments (optimizer), random batch order (data position), and hidden-state
    projections (student width 32, teacher 64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = make_student(teacher, num_layers=1, hidden_size=32)
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = 0.2
    args = DistillationConfig(output_dir=str(output), report_to=[], use_cpu=True, disable_tqdm=True, seed=3,
                              per_device_train_batch_size=4, learning_rate=3e-3, lr_scheduler_type="cosine",
                              warmup_steps=2, logging_steps=1, max_steps=STEPS, save_strategy="steps",
                              save_steps=SAVE_EVERY, loss_chunk_size=16, kd_weight=0.5, ce_weight=0.5,
                              hidden_weight=1.0, layer_map={0: 1})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                               train_dataset=BlockDataset(_blocks(tokenizer)), processing_class=tokenizer,
                               callbacks=[_KillAt(kill_at)] if kill_at is not None else None)


def _killed_run(teacher_dir, output):  # the body of the subprocess
    build(teacher_dir, output, kill_at=KILL_AT).train()
    raise SystemExit("not killed")


def _losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_reference_dir):
    full = build(tiny_reference_dir, tmp_path / "full")
    full.train()

    # The interrupted run: a real SIGKILL inside step KILL_AT + 1, in its own process.
    code = f"from tests.distillation.test_resume import _killed_run; _killed_run({str(tiny_reference_dir)!r}, " \
           f"{str(tmp_path / 'part')!r})"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    control = tmp_path / "control"  # the same checkpoint without its RNG state: the test must see the difference
    shutil.copytree(tmp_path / "part", control)
    (control / "checkpoint-2" / "rng_state.pth").unlink()

    resumed = build(tiny_reference_dir, tmp_path / "part")
    resumed.train(resume_from_checkpoint=True)
    # Same ops in the same order on restored float32 state: the result is expected to be bitwise equal. The
    # tolerance (1e-6, relative to the weights' O(0.1) scale) only admits reassociation noise; anything not
    # restored (RNG, schedule, Adam moments, data order, projections) changes each update by O(lr) = 3e-3.
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == list(range(1, STEPS + 1))  # 1-2 restored from trainer_state.json
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-6, abs=1e-6), step
    full_state = full.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, full_state[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(resumed.hidden_projections.maps["0"].weight, full.hidden_projections.maps["0"].weight,
                               rtol=1e-6, atol=1e-6)

    no_rng = build(tiny_reference_dir, control)
    no_rng.train(resume_from_checkpoint=True)
    differences = [float((tensor - full_state[name]).abs().max()) for name, tensor in no_rng.model.state_dict().items()]
    assert max(differences) > 1e-4  # dropout masks differ: the comparison above can fail


# ----- NaN / Inf --------------------------------------------------------------------------------------------
class _Poison(TrainerCallback):
    """After step 1, make the student's weights produce an infinite loss at step 2 (a divergence)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("inf"))


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing(tmp_path, tiny_teacher, tiny_tokenizer,
                                                              distill_blocks):
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                              per_device_train_batch_size=4, max_steps=4, save_strategy="no", loss_chunk_size=16)
    trainer = DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_model=tiny_teacher,
                                  args=args, train_dataset=BlockDataset(distill_blocks[:16]),
                                  processing_class=tiny_tokenizer, callbacks=[_Poison()])
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 2 of 4 \(kd_loss="):
        trainer.train()
    with pytest.raises(NonFiniteLossError, match="not saving: the training loss became non-finite at step 2"):
        trainer.save_model()
    assert not (tmp_path / "out" / "config.json").exists()


# ----- the caller's objects ---------------------------------------------------------------------------------
def test_callers_teacher_stays_trainable(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                              per_device_train_batch_size=4, max_steps=1, save_strategy="no", loss_chunk_size=16)
    data = BlockDataset(distill_blocks[:8])
    first = DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_model=tiny_teacher,
                                args=args, train_dataset=data, processing_class=tiny_tokenizer)
    first.train()
    assert all(p.requires_grad for p in tiny_teacher.parameters())
    assert all(p.grad is None for p in tiny_teacher.parameters())  # no gradient ever reached it
    # The report's case: a student deep-copied from the teacher after the first trainer was built.
    student = copy.deepcopy(tiny_teacher)
    second = DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args, train_dataset=data,
                                 processing_class=tiny_tokenizer)
    before = student.lm_head.weight.detach().clone()
    second.train()
    assert not torch.equal(before, student.lm_head.weight)


def test_student_that_cannot_learn_is_refused_at_construction(tmp_path, tiny_teacher, tiny_tokenizer):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    frozen = make_student(tiny_teacher, num_layers=1).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters.*requires_grad_\\(True\\)"):
        DistillationTrainer(model=frozen, teacher_model=tiny_teacher, args=args, processing_class=tiny_tokenizer)
    with pytest.raises(ConfigError, match="same object"):
        DistillationTrainer(model=tiny_teacher, teacher_model=tiny_teacher, args=args,
                            processing_class=tiny_tokenizer)
