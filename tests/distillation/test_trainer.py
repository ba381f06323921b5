"""DistillationTrainer on the tiny reference teacher: training, normalisation, projections, resume, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from hfcompress import DistillationConfig, DistillationTrainer, make_student
from hfcompress.core.data import BlockDataset
from hfcompress.distillation.hidden import PROJECTIONS_FILE
from hfcompress.core.errors import ConfigError, DataError


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                    loss_chunk_size=16)
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


class MaskedBlocks(torch.utils.data.Dataset):
    """Blocks whose labels ignore a different number of leading tokens per example (uneven token counts)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        ids = self.blocks[index]
        labels = ids.clone()
        labels[: (7 * index) % 23] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_distillation_loss_falls(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    student = make_student(tiny_teacher, num_layers=1)
    args = config(tmp_path, kd_weight=1.0, ce_weight=0.0, hidden_weight=0.0, max_steps=25)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args,
                                  train_dataset=BlockDataset(distill_blocks[:48]),
                                  eval_dataset=BlockDataset(distill_blocks[48:64]), processing_class=tiny_tokenizer)
    before = trainer.evaluate()["eval_kd_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_kd_loss"]
    assert after < 0.8 * before
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 25 and "ce_loss" in logged[0] and "hidden_loss" not in logged[0]
    assert all(p.requires_grad and p.grad is None for p in tiny_teacher.parameters())  # the caller's flags, untouched
    assert not trainer.teacher_model.training


def _one_step(tmp_path, teacher, tokenizer, blocks, batch, accumulation, **kwargs):
    torch.manual_seed(0)
    student = make_student(teacher, num_layers=1, hidden_size=32)
    args = config(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                  max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0,
                  train_sampling_strategy="sequential", **kwargs)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=MaskedBlocks(blocks[:4]), processing_class=tokenizer)
    result = trainer.train()
    projections = {k: v.clone() for k, v in trainer.hidden_projections.state_dict().items()}
    return result.training_loss, {k: v.clone() for k, v in student.state_dict().items()}, projections


def test_gradient_accumulation_invariance(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    # One optimizer step over the same 4 examples (with 8..22 ignored labels each) must not depend on how
    # they are split into micro-batches: every token weighs 1/(tokens in the step).
    kwargs = dict(hidden_weight=0.5, hidden_loss="mse", ce_weight=0.3, kd_weight=0.7)
    reference = _one_step(tmp_path / "a", tiny_teacher, tiny_tokenizer, distill_blocks, 4, 1, **kwargs)
    for batch, accumulation in ((2, 2), (1, 4)):
        other = _one_step(tmp_path / f"b{batch}", tiny_teacher, tiny_tokenizer, distill_blocks, batch, accumulation,
                          **kwargs)
        assert other[0] == pytest.approx(reference[0], rel=1e-5)
        for name, tensor in reference[1].items():
            assert torch.allclose(other[1][name], tensor, atol=1e-6), name
        for name, tensor in reference[2].items():
            assert torch.allclose(other[2][name], tensor, atol=1e-6), name
    initial = make_student(tiny_teacher, num_layers=1, hidden_size=32).state_dict()
    assert not torch.allclose(initial["model.layers.0.mlp.up_proj.weight"],
                              reference[1]["model.layers.0.mlp.up_proj.weight"])


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_equals_full_logits_and_padded_teacher_rows_are_ignored(tmp_path, tiny_teacher, tiny_tokenizer,
                                                                          distill_blocks):
    batch = MaskedBlocks(distill_blocks)
    batch = {k: torch.stack([batch[i][k] for i in range(3)]) for k in ("input_ids", "labels", "attention_mask")}
    student = make_student(tiny_teacher, num_layers=1)
    results = []
    for chunk in (0, 7):
        args = config(tmp_path, loss="jsd", temperature=2.0, loss_chunk_size=chunk)
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=tiny_teacher, args=args,
                                      processing_class=tiny_tokenizer)
        results.append(_loss_and_grads(trainer, batch))
    # A teacher whose embedding matrix is padded with 13 extra rows (random values) gives the same loss.
    padded = copy.deepcopy(tiny_teacher)
    padded.resize_token_embeddings(len(tiny_tokenizer) + 13, mean_resizing=False)
    with torch.no_grad():
        padded.lm_head.weight[len(tiny_tokenizer):].normal_(0, 5.0)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=padded,
                                  args=config(tmp_path, loss="jsd", temperature=2.0, loss_chunk_size=7),
                                  processing_class=tiny_tokenizer)
    assert trainer.vocab_rows == len(tiny_tokenizer)
    results.append(_loss_and_grads(trainer, batch))
    reference_loss, reference_grads = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-6), name


def test_projections_saved_apart_and_restored_on_resume(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    from transformers import AutoModelForCausalLM

    class StopAt(TrainerCallback):  # an interruption: the run stops after `step` of its 4 steps
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= self.step

    def run(output, stop_at=4, resume=None):
        torch.manual_seed(0)
        student = make_student(tiny_teacher, num_layers=1, hidden_size=32)
        args = config(output, hidden_weight=1.0, hidden_loss="cosine", layer_map={0: 1}, max_steps=4,
                      save_strategy="steps", save_steps=2, train_sampling_strategy="sequential")
        trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args,
                                      train_dataset=BlockDataset(distill_blocks[:24]), processing_class=tiny_tokenizer,
                                      callbacks=[StopAt(stop_at)])
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    with safe_open(str(checkpoint / PROJECTIONS_FILE), framework="pt") as handle:
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
        assert json.loads(handle.metadata()["layer_map"]) == {"0": 1}
    assert list(saved) == ["maps.0.weight"] and saved["maps.0.weight"].shape == (64, 32)
    assert not torch.allclose(saved["maps.0.weight"], torch.eye(64, 32))  # trained
    # The student checkpoint holds only the student and loads as a plain model.
    for folder in (tmp_path / "full", checkpoint):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            assert not any("maps" in key or "projection" in key for key in handle.keys())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.hidden_size == 32

    # Interrupted after 2 steps, then resumed from checkpoint-2: same projections and student as the full run.
    run(tmp_path / "part", stop_at=2)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert torch.allclose(resumed.hidden_projections.maps["0"].weight.detach(), saved["maps.0.weight"], atol=1e-5)
    full_state = full.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.allclose(tensor, full_state[name], atol=1e-5), name


def test_resume_without_training_restores_projections(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    def trainer_for(steps):
        torch.manual_seed(0)
        student = make_student(tiny_teacher, num_layers=1, hidden_size=32)
        args = config(tmp_path, hidden_weight=1.0, max_steps=steps, save_strategy="steps", save_steps=2)
        return DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args,
                                   train_dataset=BlockDataset(distill_blocks[:16]), processing_class=tiny_tokenizer)

    trained = trainer_for(2)
    trained.train()
    fresh = trainer_for(2)
    assert torch.equal(fresh.hidden_projections.maps["0"].weight, torch.eye(64, 32))
    fresh.train(resume_from_checkpoint=True)  # already at max_steps: loads, trains nothing
    assert list(fresh.hidden_projections.maps) == ["0"]  # uniform map of 1 student layer: {0: 1}
    assert torch.equal(fresh.hidden_projections.maps["0"].weight, trained.hidden_projections.maps["0"].weight)


# ----- bad input -> clear error -----------------------------------------------------------------------------
def test_different_tokenizers_are_refused(tmp_path, tiny_teacher, tiny_tokenizer, calibration_texts):
    from hfcompress.models.reference import train_tokenizer

    other = train_tokenizer(calibration_texts[:4], vocab_size=len(tiny_tokenizer))
    folder = tmp_path / "teacher"
    tiny_teacher.save_pretrained(folder)
    other.save_pretrained(folder)
    with pytest.raises(ConfigError, match="different tokenizers"):
        DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_model=str(folder),
                            args=config(tmp_path), processing_class=tiny_tokenizer)


def test_teacher_without_the_vocabulary_is_refused(tmp_path, tiny_teacher, tiny_tokenizer):
    student = make_student(tiny_teacher, num_layers=1)
    tiny_teacher.resize_token_embeddings(100)
    with pytest.raises(ConfigError, match="teacher's LM head has 100 rows"):
        DistillationTrainer(model=student, teacher_model=tiny_teacher, args=config(tmp_path),
                            processing_class=tiny_tokenizer)


def test_missing_layer_and_empty_dataset(tmp_path, tiny_teacher, tiny_tokenizer):
    student = make_student(tiny_teacher, num_layers=1)
    with pytest.raises(ConfigError, match="teacher layer 5"):
        DistillationTrainer(model=student, teacher_model=tiny_teacher, processing_class=tiny_tokenizer,
                            args=config(tmp_path, hidden_weight=1.0, layer_map={0: 5}))
    with pytest.raises(DataError, match="empty"):
        DistillationTrainer(model=student, teacher_model=tiny_teacher, processing_class=tiny_tokenizer,
                            args=config(tmp_path), train_dataset=BlockDataset(torch.zeros(0, 8, dtype=torch.long)))


def test_model_without_hidden_states_is_refused(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    class NoHiddenStates(type(tiny_teacher)):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.hidden_states = None
            return outputs

    student = NoHiddenStates(make_student(tiny_teacher, num_layers=1).config)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, processing_class=tiny_tokenizer,
                                  args=config(tmp_path, hidden_weight=1.0))
    batch = BlockDataset(distill_blocks[:2])
    with pytest.raises(ConfigError, match="hidden states"):
        trainer.compute_loss(student, {k: torch.stack([batch[i][k] for i in range(2)]) for k in batch[0]})


def test_unknown_logit_transform_is_detected(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    # Llama ignores `final_logit_softcapping`, so an LM head that applies it no longer matches the logits:
    # the first batch's check must say so instead of training on wrong logits.
    tiny_teacher.config.final_logit_softcapping = 0.5
    trainer = DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_model=tiny_teacher,
                                  processing_class=tiny_tokenizer, args=config(tmp_path))
    batch = BlockDataset(distill_blocks[:2])
    with pytest.raises(ConfigError, match="loss_chunk_size=0"):
        trainer.compute_loss(trainer.model, {k: torch.stack([batch[i][k] for i in range(2)]) for k in batch[0]})
