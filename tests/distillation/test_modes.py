"""Offline (teacher cache), online and self distillation: each mode does what it says, not the live default."""

from __future__ import annotations

import copy
import math
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfcompress import DistillationConfig, DistillationTrainer, make_student
from hfcompress.core.data import BlockDataset
from hfcompress.core.errors import ConfigError
from hfcompress.distillation import cache as K
from hfcompress.distillation.modes import truncate


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                    loss_chunk_size=0, hidden_weight=0.0)
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


# --------------------------------------------------------------------------------------------------------
# The cache format
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 3, 7, 9, 13])
def test_bit_packing_round_trips(width):
    values = np.random.default_rng(width).integers(0, 1 << width, size=(5, 63))
    assert np.array_equal(K.unpack_bits(K.pack_bits(values, width), width, 63), values)


@pytest.mark.parametrize("fmt", ["uint8", "uint7", "uint6"])
def test_rows_round_trip_ids_exactly_and_logprobs_within_half_a_step(fmt):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 512, generator=gen) * 3
    logits[:20, :64] += 8  # rows whose top-k are nearby ids: small gaps, few bits
    logp = F.log_softmax(logits, -1)
    top_logp, top_ids = logp.topk(64, dim=-1)
    tail = torch.log1p(-top_logp.exp().sum(-1))
    encoded = K.encode_rows(top_ids, top_logp, tail, 512, fmt)
    assert len(np.unique(encoded["width"])) > 1  # rows of different gap widths
    ids, stored, stored_tail = K.decode_rows(encoded, np.arange(40), 64, fmt)
    order = top_ids.argsort(-1)
    assert torch.equal(ids, top_ids.gather(-1, order))
    step = torch.from_numpy(encoded["logp_step"].astype(np.float32))
    # Half a step of rounding, plus the re-derived top log-prob (a weighted mean of the rounding errors, so at
    # most another half step) and the float16 tail.
    assert ((stored - top_logp.gather(-1, order)).abs() <= step[:, None] + 2e-3).all()
    assert torch.allclose(stored_tail, tail, rtol=1e-3, atol=0)  # float16
    subset = np.array([3, 17, 25])  # decoding any rows, not just all of them
    assert torch.equal(K.decode_rows(encoded, subset, 64, fmt)[1], stored[subset])


@pytest.fixture()
def cache_dir(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    K.write_teacher_cache(tiny_teacher, distill_blocks[:16], tmp_path / "cache", top_k=64, tokenizer=tiny_tokenizer,
                          teacher_name="tiny", progress=False)
    return tmp_path / "cache"


def test_cache_is_compact_and_describes_itself(cache_dir, distill_blocks):
    cache = K.TeacherCache(cache_dir)
    meta = cache.meta
    assert (meta.top_k, meta.temperature, meta.vocab_size, meta.num_blocks) == (64, 1.0, 512, 16)
    assert meta.data_fingerprint == K.tensor_hash([("blocks", distill_blocks[:16])])
    # The target at k = 64: 7-bit log-prob codes and delta-coded ids (vocabulary 512 here).
    assert meta.logprob_format == "uint7" and meta.bytes_per_token <= 128
    assert 0 < meta.mean_tail_mass < 1 and meta.quantization_kl < 1e-3
    assert torch.equal(cache.blocks(), distill_blocks[:16])


def _batch(blocks, indices):
    ids = blocks[indices]
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "cache_index": torch.tensor(indices)}


@pytest.mark.parametrize("loss,chunk", [("forward_kl", 0), ("reverse_kl", 0), ("jsd", 0), ("forward_kl", 7),
                                        ("jsd", 7)])
def test_cache_with_k_equal_vocab_gives_the_live_loss(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks, loss,
                                                      chunk):
    K.write_teacher_cache(tiny_teacher, distill_blocks[:4], tmp_path / "full", top_k=512, tokenizer=tiny_tokenizer,
                          temperature=2.0, logprob_format="float32", progress=False)
    student = make_student(tiny_teacher, num_layers=1)
    kwargs = dict(loss=loss, temperature=2.0, kd_weight=1.0, ce_weight=0.5, loss_chunk_size=chunk)
    live = DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(tiny_teacher),
                               args=config(tmp_path / "a", **kwargs), train_dataset=BlockDataset(distill_blocks[:4]),
                               processing_class=tiny_tokenizer)
    cached = DistillationTrainer(model=copy.deepcopy(student), teacher_cache=tmp_path / "full",
                                 args=config(tmp_path / "b", mode="cache", **kwargs), processing_class=tiny_tokenizer)
    batch = _batch(distill_blocks, [2, 0, 3])
    live_batch = {k: v for k, v in batch.items() if k != "cache_index"}
    expected = live.compute_loss(live.model, live_batch)
    got = cached.compute_loss(cached.model, batch)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_cache_loss_equals_the_full_logits_loss(tmp_path, cache_dir, tiny_teacher, tiny_tokenizer,
                                                        distill_blocks, temperature):
    """Top-64 cache: the chunked loss (at most 7 rows of (·, V) logits at a time, gradients per chunk) gives the
    loss and the student's gradients of the one computed from the model's full logits."""
    if temperature != 1.0:
        cache_dir = tmp_path / "t2"
        K.write_teacher_cache(tiny_teacher, distill_blocks[:16], cache_dir, top_k=64, temperature=temperature,
                              tokenizer=tiny_tokenizer, progress=False)
    student = make_student(tiny_teacher, num_layers=1)
    batch = _batch(distill_blocks, [5, 1, 9])
    batch["labels"][0, 10:20] = -100  # ignored positions are skipped in both
    results = []
    for chunk in (0, 7):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_cache=cache_dir,
                                      processing_class=tiny_tokenizer,
                                      args=config(tmp_path / f"c{chunk}", mode="cache", loss_chunk_size=chunk,
                                                  temperature=temperature, kd_weight=1.0, ce_weight=0.5))
        assert trainer._chunked == (chunk > 0)
        loss = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, trainer._components["train"].clone()))
    (full, full_grads, full_parts), (chunked, chunked_grads, chunked_parts) = results
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(chunked_parts, full_parts, rtol=1e-5)  # the logged kd/ce sums and the token count
    assert full_grads and full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def _spy(module, calls):
    """Count calls of ``module`` (its forward keeps its signature, which the Trainer inspects)."""
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.forward = forward


def test_cache_training_runs_no_teacher(tmp_path, cache_dir, tiny_teacher, tiny_tokenizer):
    teacher_calls, student_calls = [], []
    _spy(tiny_teacher, teacher_calls)
    student = make_student(tiny_teacher, num_layers=1)
    _spy(student, student_calls)
    # The teacher is given only to check the cache against it; it must never run.
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, teacher_cache=cache_dir,
                                  args=config(tmp_path, mode="cache", max_steps=8, ce_weight=0.0),
                                  processing_class=tiny_tokenizer)
    assert trainer.teacher_model is None and not hasattr(trainer.signal, "teacher")
    trainer.train()
    assert teacher_calls == [] and len(student_calls) == 8
    kd = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(kd) == 8 and np.mean(kd[-2:]) < np.mean(kd[:2])


def test_cache_approximation_error_is_reported_and_a_lower_bound(cache_dir, tiny_teacher):
    student = make_student(tiny_teacher, num_layers=1)
    error = K.approximation_error(K.TeacherCache(cache_dir), tiny_teacher, student, num_blocks=2)
    assert 0 < error["bucket_kl"] <= error["full_kl"] * (1 + 1e-3)  # coarser partition: lower KL
    assert 0 <= error["relative_gap"] < 0.5


def test_cache_mismatches_are_refused(tmp_path, cache_dir, tiny_teacher, tiny_tokenizer):
    student = make_student(tiny_teacher, num_layers=1)

    def make(**kwargs):
        teacher = kwargs.pop("teacher_model", None)
        return DistillationTrainer(model=student, teacher_cache=cache_dir, teacher_model=teacher,
                                   args=config(tmp_path, mode="cache", **kwargs), processing_class=tiny_tokenizer)

    with pytest.raises(K.TeacherCacheError, match="temperature 1.0.*temperature=2.0"):
        make(temperature=2.0)
    with pytest.raises(K.TeacherCacheError, match="top 64.*cache_top_k=32"):
        make(cache_top_k=32)
    with pytest.raises(K.TeacherCacheError, match="teacher 'tiny', not 'other'"):
        make(teacher_model="other")
    changed = copy.deepcopy(tiny_teacher)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.01)
    with pytest.raises(K.TeacherCacheError, match="other weights"):
        make(teacher_model=changed)
    other_tokenizer = copy.deepcopy(tiny_tokenizer)
    other_tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(K.TeacherCacheError, match="another tokenizer"):
        DistillationTrainer(model=student, teacher_cache=cache_dir, args=config(tmp_path, mode="cache"),
                            processing_class=other_tokenizer)
    make(teacher_model=tiny_teacher)  # the right teacher passes (and is not kept)
    with pytest.raises(ConfigError, match="set mode='cache'"):
        DistillationTrainer(model=student, teacher_cache=cache_dir, args=config(tmp_path))
    with pytest.raises(ConfigError, match="hidden_weight"):  # (mode='cache' reads them from the cache)
        DistillationConfig(output_dir=str(tmp_path), report_to=[], mode="self", hidden_weight=1.0)


# --------------------------------------------------------------------------------------------------------
# Hidden states in the cache
# --------------------------------------------------------------------------------------------------------
class _RaisingTeacher(torch.nn.Module):
    """Stands for the teacher where none may run."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher ran")


@pytest.mark.parametrize("layer_map,hidden_loss,width", [("uniform", "cosine", None), ({"0": 0}, "mse", None),
                                                         ("last", "mse", 32)])
def test_cache_with_hidden_states_gives_the_live_loss(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks,
                                                      layer_map, hidden_loss, width):
    meta = K.write_teacher_cache(tiny_teacher, distill_blocks[:4], tmp_path / "full", top_k=512,
                                 tokenizer=tiny_tokenizer, logprob_format="float32", hidden_layers=[1, 0],
                                 hidden_dtype="float32", progress=False)
    assert (meta.hidden_layers, meta.hidden_size, meta.hidden_dtype, meta.teacher_num_layers) == ([0, 1], 64,
                                                                                                "float32", 2)
    assert meta.hidden_bytes_per_token == 2 * 64 * 4  # two layers of 64 float32 values per predicted token
    student = make_student(tiny_teacher, num_layers=1, hidden_size=width)  # width 32: learned projections
    kwargs = dict(kd_weight=1.0, ce_weight=0.5, hidden_weight=3.0, hidden_loss=hidden_loss, layer_map=layer_map)
    live = DistillationTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(tiny_teacher),
                               args=config(tmp_path / "a", **kwargs), train_dataset=BlockDataset(distill_blocks[:4]),
                               processing_class=tiny_tokenizer)
    cached = DistillationTrainer(model=copy.deepcopy(student), teacher_cache=tmp_path / "full",
                                 args=config(tmp_path / "b", mode="cache", **kwargs), processing_class=tiny_tokenizer)
    assert cached.layer_map == live.layer_map and cached.teacher_model is None
    assert cached.hidden_projections.has_parameters() == (width is not None)
    batch = _batch(distill_blocks, [2, 0, 3])
    batch["labels"][0, :5] = -100  # masked positions are skipped in both
    expected = live.compute_loss(live.model, {k: v for k, v in batch.items() if k != "cache_index"})
    got = cached.compute_loss(cached.model, batch)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # ... and the hidden term is really in it: without it the two differ.
    hidden = cached._components["train"][2]
    assert hidden > 0.01 * got.item() * batch["labels"].numel()


def test_cache_hidden_training_runs_no_teacher(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    K.write_teacher_cache(tiny_teacher, distill_blocks[:8], tmp_path / "cache", top_k=32, tokenizer=tiny_tokenizer,
                          hidden_layers=[1], progress=False)
    cache = K.TeacherCache(tmp_path / "cache")
    assert cache.meta.hidden_dtype == "float16" and cache.meta.hidden_bytes_per_token == 64 * 2
    with torch.no_grad():  # the stored states are the teacher's, to float16 precision
        exact = tiny_teacher(input_ids=distill_blocks[[5, 1]], output_hidden_states=True).hidden_states[2]
    stored = cache.hidden_rows(torch.tensor([5, 1]), 1).float()
    assert stored.dtype == torch.float32 and torch.allclose(stored, exact[:, :-1].reshape(-1, 64), rtol=1e-3,
                                                            atol=1e-3)
    student = make_student(tiny_teacher, num_layers=1)
    trainer = DistillationTrainer(model=student, teacher_model=None, teacher_cache=tmp_path / "cache",
                                  args=config(tmp_path / "run", mode="cache", max_steps=4, hidden_weight=10.0,
                                              layer_map="last", hidden_loss="mse"), processing_class=tiny_tokenizer)
    trainer.teacher_model = _RaisingTeacher()  # nothing may run a teacher
    trainer.train()
    hidden = [entry["hidden_loss"] for entry in trainer.state.log_history if "hidden_loss" in entry]
    assert len(hidden) == 4 and all(h > 0 for h in hidden) and hidden[-1] < hidden[0]


def test_cache_hidden_state_errors(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks, cache_dir):
    student = make_student(tiny_teacher, num_layers=1)

    def trainer(folder, **kwargs):
        return DistillationTrainer(model=student, teacher_cache=folder, processing_class=tiny_tokenizer,
                                   args=config(tmp_path / "run", mode="cache", hidden_weight=1.0, **kwargs))

    with pytest.raises(K.TeacherCacheError, match="holds no hidden states.*--hidden-layers"):
        trainer(cache_dir)  # written without hidden states
    K.write_teacher_cache(tiny_teacher, distill_blocks[:2], tmp_path / "h", top_k=8, hidden_layers=[0], progress=False)
    with pytest.raises(K.TeacherCacheError, match=r"needs teacher layers \[1\].*layers \[0\] only.*--hidden-layers 1"):
        trainer(tmp_path / "h")  # 'uniform' maps the 1-layer student onto teacher layer 1
    assert trainer(tmp_path / "h", layer_map={"0": 0}).layer_map == {0: 0}
    with pytest.raises(ConfigError, match=r"hidden layers \[2\] do not exist.*0\.\.1"):
        K.write_teacher_cache(tiny_teacher, distill_blocks[:2], tmp_path / "bad", top_k=8, hidden_layers=[2],
                              progress=False)
    with pytest.raises(ConfigError, match="hidden_dtype='int8'"):
        K.write_teacher_cache(tiny_teacher, distill_blocks[:2], tmp_path / "bad", top_k=8, hidden_layers=[0],
                              hidden_dtype="int8", progress=False)
    # A cache whose stored width is not the one its metadata states (edited, or mixed up) is refused on open.
    meta = json.loads((tmp_path / "h" / K.METADATA_FILE).read_text())
    meta["hidden_size"] = 128
    (tmp_path / "h" / K.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(K.TeacherCacheError, match=r"shape \[62, 64\].*hidden_size 128"):
        K.TeacherCache(tmp_path / "h")
    with pytest.raises(ConfigError, match="mode='online' has no teacher hidden states"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], mode="online", hidden_weight=1.0)


def test_cli_cache_teacher_stores_hidden_states(tmp_path, tiny_reference_dir, capsys):
    from hfcompress.cli import main

    out = tmp_path / "cache"
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(out), "--data", "stdlib:validation",
                 "--block-size", "16", "--num-blocks", "2", "--top-k", "8", "--hidden-layers", "1", "0",
                 "--hidden-dtype", "bfloat16", "-q"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[:printed.rindex("}") + 1])
    assert (summary["hidden_layers"], summary["hidden_dtype"], summary["hidden_bytes_per_token"]) == \
        ([0, 1], "bfloat16", 2 * 64 * 2)
    assert "256.0 bytes/token of hidden states (layers 0, 1, bfloat16)" in printed
    assert K.TeacherCache(out).hidden_rows(torch.tensor([1]), 0).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------
# Online
# --------------------------------------------------------------------------------------------------------
def test_online_trains_the_teacher_and_saves_it(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    from transformers import AutoModelForCausalLM

    before = {n: p.detach().clone() for n, p in tiny_teacher.named_parameters()}
    student = make_student(tiny_teacher, num_layers=1)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher,
                                  args=config(tmp_path, mode="online", max_steps=3, mutual_weight=0.5,
                                              teacher_learning_rate=1e-3),
                                  train_dataset=BlockDataset(distill_blocks[:12]), processing_class=tiny_tokenizer)
    trainer.train()
    changed = [n for n, p in tiny_teacher.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)  # every teacher parameter moved
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert torch.equal(saved.lm_head.weight, tiny_teacher.lm_head.weight.detach())


def test_online_checkpoints_hold_the_teacher_and_a_resume_continues_it(tmp_path, tiny_teacher, tiny_tokenizer,
                                                                        distill_blocks):
    """checkpoint-N/teacher (loadable) and the teacher's optimizer state are written inside the staged checkpoint;
    resuming from it continues the teacher where it was (weights and AdamW moments), not from its start."""
    import copy

    from transformers import AutoModelForCausalLM

    def trainer_for(out, teacher):
        return DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                                   args=config(out, mode="online", max_steps=4, save_strategy="steps", save_steps=2,
                                               teacher_learning_rate=1e-3, mutual_weight=0.5),
                                   train_dataset=BlockDataset(distill_blocks[:16]), processing_class=tiny_tokenizer)

    start = copy.deepcopy(tiny_teacher)
    full_teacher = copy.deepcopy(start)
    full = trainer_for(tmp_path / "full", full_teacher)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "teacher" / "config.json").is_file() and (checkpoint / "teacher_optimizer.safetensors").is_file()
    at_two = AutoModelForCausalLM.from_pretrained(checkpoint / "teacher")
    assert not torch.equal(at_two.lm_head.weight, start.lm_head.weight)  # it trained

    resumed_teacher = copy.deepcopy(start)  # what a resumed run is given: the teacher's starting weights
    resumed = trainer_for(tmp_path / "full", resumed_teacher)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, value), expected in zip(resumed_teacher.state_dict().items(), full_teacher.state_dict().values()):
        assert torch.allclose(value, expected, rtol=1e-5, atol=1e-6), name


def test_online_refuses_a_teacher_that_cannot_train(tmp_path, tiny_teacher, tiny_tokenizer):
    from hfcompress import QuantizationConfig, quantize

    student = make_student(tiny_teacher, num_layers=1)
    frozen = copy.deepcopy(tiny_teacher).requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad=False"):
        DistillationTrainer(model=student, teacher_model=frozen, args=config(tmp_path, mode="online"))
    quantized = quantize(copy.deepcopy(tiny_teacher), QuantizationConfig(bits=8, group_size=None), progress=False)
    with pytest.raises(ConfigError, match="quantized"):
        DistillationTrainer(model=student, teacher_model=quantized, args=config(tmp_path, mode="online"))


# --------------------------------------------------------------------------------------------------------
# Self
# --------------------------------------------------------------------------------------------------------
def _exit_kl(model, blocks, layer):
    """KL(final ‖ exit at ``layer``) of ``model`` on ``blocks``, and the truncated model's own logits check."""
    from hfcompress.distillation.modes import final_norm

    with torch.no_grad():
        out = model(input_ids=blocks, output_hidden_states=True)
        exit_logits = model.lm_head(final_norm(model)(out.hidden_states[layer + 1]))
        kl = F.kl_div(F.log_softmax(exit_logits, -1), F.log_softmax(out.logits, -1), reduction="none",
                      log_target=True).sum(-1)  # (B, T)
        return kl.mean().item(), exit_logits


def _self_train(tmp_path, teacher, tokenizer, blocks, kd_weight):
    model = copy.deepcopy(teacher)
    args = config(tmp_path, mode="self", exit_layers=[0], max_steps=20, kd_weight=kd_weight, ce_weight=1.0,
                  learning_rate=1e-3)
    DistillationTrainer(model=model, args=args, train_dataset=BlockDataset(blocks),
                        processing_class=tokenizer).train()
    return model


def test_self_distillation_trains_the_exits_and_truncation_keeps_them(tmp_path, tiny_teacher, tiny_tokenizer,
                                                                      distill_blocks):
    held_out = distill_blocks[40:44]
    before, _ = _exit_kl(tiny_teacher, held_out, 0)
    model = _self_train(tmp_path / "self", tiny_teacher, tiny_tokenizer, distill_blocks[:40], kd_weight=1.0)
    # The control: the same steps with the exit term off (the default thing: plain cross-entropy training).
    control = _self_train(tmp_path / "ce", tiny_teacher, tiny_tokenizer, distill_blocks[:40], kd_weight=0.0)
    after, exit_logits = _exit_kl(model, held_out, 0)
    control_after, _ = _exit_kl(control, held_out, 0)
    assert after < 0.9 * before and after < 0.9 * control_after  # the exit learned from the final layer
    changed = [n for n, p in model.model.layers[0].named_parameters()
               if not torch.equal(p, dict(tiny_teacher.model.layers[0].named_parameters())[n])]
    assert changed
    short = truncate(model, 1)
    assert short.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.allclose(short(input_ids=held_out).logits, exit_logits, atol=1e-4, rtol=1e-4)


def test_self_and_truncate_errors(tmp_path, tiny_teacher):
    with pytest.raises(ConfigError, match="exits are layers 0..0"):
        DistillationTrainer(model=copy.deepcopy(tiny_teacher), args=config(tmp_path, mode="self", exit_layers=[5]))
    with pytest.raises(ConfigError, match="exit_layers is for mode='self'"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], exit_layers=[0])
    with pytest.raises(ConfigError, match="drop teacher_model"):
        DistillationTrainer(model=copy.deepcopy(tiny_teacher), teacher_model=tiny_teacher,
                            args=config(tmp_path, mode="self"))
    with pytest.raises(ConfigError, match="the model has 2"):
        truncate(tiny_teacher, 3)


# --------------------------------------------------------------------------------------------------------
# Self with an EMA teacher
# --------------------------------------------------------------------------------------------------------
def _ema_trainer(tmp_path, teacher, tokenizer, blocks, **kwargs):
    args = config(tmp_path, mode="self", self_teacher="ema", **{"ema_decay": 0.9, "learning_rate": 1e-2, **kwargs})
    return DistillationTrainer(model=copy.deepcopy(teacher), args=args, train_dataset=BlockDataset(blocks),
                               processing_class=tokenizer)


def test_ema_teacher_follows_the_decay_formula(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    from transformers import TrainerCallback

    trainer = _ema_trainer(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks[:12], max_steps=3)
    ema = trainer.signal.ema.model
    assert ema is not trainer.model and not any(p.requires_grad for p in ema.parameters())
    snapshots = [({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                  {n: p.detach().clone() for n, p in ema.named_parameters()})]

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step and the EMA update
            snapshots.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                              {n: p.detach().clone() for n, p in ema.named_parameters()}))

    trainer.add_callback(Record())
    trainer.train()
    assert len(snapshots) == 4
    assert all(torch.equal(snapshots[0][0][n], snapshots[0][1][n]) for n in snapshots[0][0])  # starts as a copy
    for (_, ema_before), (student, ema_after) in zip(snapshots, snapshots[1:]):
        for name, value in ema_after.items():
            expected = 0.9 * ema_before[name] + 0.1 * student[name]  # ema <- d·ema + (1-d)·model
            assert torch.allclose(value, expected, rtol=1e-6, atol=1e-7), name
            assert ema.get_parameter(name).grad is None
    moved = [n for n in student if not torch.equal(student[n], snapshots[0][0][n])]
    assert moved and all(not torch.equal(ema_after[n], student[n]) for n in moved)  # a lagging average


@pytest.mark.parametrize("exit_layers", [None, [0]])
def test_ema_teacher_kl_is_in_the_loss(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks, exit_layers):
    from hfcompress.distillation.modes import final_norm

    trainer = _ema_trainer(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks[:4], exit_layers=exit_layers,
                           kd_weight=1.0, ce_weight=0.5, temperature=2.0)
    ema = trainer.signal.ema.model
    with torch.no_grad():  # an EMA that has drifted from the model, as it does during training
        for param in ema.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batch = BlockDataset(distill_blocks[:3])
    batch = {k: torch.stack([batch[i][k] for i in range(3)]) for k in batch[0]}
    got = trainer.compute_loss(trainer.model, batch)

    model = trainer.model
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_hidden_states=True)
        teacher = F.log_softmax(ema(input_ids=batch["input_ids"]).logits[:, :-1] / 2.0, -1)
        outputs = [out.logits] + [model.lm_head(final_norm(model)(out.hidden_states[layer + 1]))
                                  for layer in exit_layers or []]
        kl = sum(4.0 * F.kl_div(F.log_softmax(logits[:, :-1] / 2.0, -1), teacher, reduction="none",
                                log_target=True).sum(-1) for logits in outputs) / len(outputs)  # T² = 4
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), batch["input_ids"][:, 1:].reshape(-1),
                             reduction="none")
        expected = (kl.reshape(-1) + 0.5 * ce).mean()
    assert kl.mean() > 1e-3  # the teacher term is not negligible: a CE-only loss would differ
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, 0.5 * ce.mean(), rtol=1e-3)


def test_ema_teacher_is_saved_and_resumed(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    blocks = distill_blocks[:16]
    full = _ema_trainer(tmp_path / "full", tiny_teacher, tiny_tokenizer, blocks, max_steps=2, save_strategy="steps",
                        save_steps=1)
    full.train()
    assert (tmp_path / "full" / "checkpoint-1" / "ema.safetensors").is_file()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "ema")
    final_ema = full.signal.ema.model.state_dict()
    assert all(torch.equal(saved.state_dict()[n], final_ema[n]) for n in final_ema)
    assert not torch.equal(final_ema["lm_head.weight"], full.model.lm_head.weight)  # the student is not the EMA
    checkpoint_ema = load_file(tmp_path / "full" / "checkpoint-1" / "ema.safetensors")

    resumed = _ema_trainer(tmp_path / "full", tiny_teacher, tiny_tokenizer, blocks, max_steps=2,
                           save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    # The resumed EMA continued from the checkpoint's (not from the resumed model's weights) ...
    for name, value in resumed.signal.ema.model.state_dict().items():
        assert torch.allclose(value, final_ema[name], rtol=1e-5, atol=1e-6), name
    # ... which is a different state than the model's own weights at step 1.
    assert not torch.allclose(checkpoint_ema["lm_head.weight"],
                              load_file(tmp_path / "full" / "checkpoint-1" / "model.safetensors")["lm_head.weight"])


def test_ema_config_errors(tmp_path, tiny_teacher):
    base = dict(output_dir=str(tmp_path), report_to=[], mode="self", self_teacher="ema")
    for decay in (1.0, -0.1, 1.5, "0.9", True):
        with pytest.raises(ConfigError, match=r"ema_decay must be a number in \[0, 1\)"):
            DistillationConfig(**base, ema_decay=decay)
    with pytest.raises(ConfigError, match="self_teacher='ema' is for mode='self'"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], self_teacher="ema")
    with pytest.raises(ConfigError, match="self_teacher='mean' is unknown; choose one of final, ema"):
        DistillationConfig(**{**base, "self_teacher": "mean"})
    assert DistillationConfig(**base, ema_decay=0.0).ema_decay == 0.0


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def test_cli_cache_teacher_and_truncate(tmp_path, tiny_reference_dir, distill_text_file, capsys):
    import json

    from hfcompress.cli import main

    out = tmp_path / "cache"
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(out), "--data", str(distill_text_file),
                 "--block-size", "32", "--num-blocks", "4", "--top-k", "16", "--temperature", "2.0", "-q",
                 "--student", str(tiny_reference_dir)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[:printed.rindex("}") + 1])
    assert (summary["top_k"], summary["temperature"], summary["num_blocks"]) == (16, 2.0, 4)
    assert summary["approximation_error"]["full_kl"] == pytest.approx(0.0, abs=1e-5)  # the teacher as student
    assert K.TeacherCache(out).meta.teacher == str(tiny_reference_dir)
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(out), "-q"]) != 0  # not clobbered
    assert "not empty" in capsys.readouterr().err
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(tmp_path / "drawn"), "--data",
                 str(distill_text_file), "--block-size", "32", "--num-blocks", "4", "--top-k", "16",
                 "--tail-draws", "8", "-q"]) == 0
    capsys.readouterr()
    assert (K.TeacherCache(tmp_path / "drawn").meta.tail_draws, K.TeacherCache(tmp_path / "drawn").rows(
        torch.tensor([0]))[0].shape[1]) == (8, 24)
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(tmp_path / "bad"), "--data",
                 str(distill_text_file), "--block-size", "32", "--num-blocks", "4", "--sampling", "sample",
                 "--tail-draws", "8", "-q"]) != 0
    error = capsys.readouterr().err
    assert "go beside a top-k cache" in error and "Traceback" not in error

    assert main(["truncate", str(tiny_reference_dir), str(tmp_path / "short"), "--layers", "1"]) == 0
    assert json.loads((tmp_path / "short" / "config.json").read_text())["num_hidden_layers"] == 1
    assert main(["truncate", str(tiny_reference_dir), str(tmp_path / "long"), "--layers", "3"]) != 0
    assert "the model has 2" in capsys.readouterr().err


def test_distill_script_runs_the_cache_and_self_modes(tmp_path, tiny_reference_dir, capsys):
    from hfcompress.cli import main
    from hfcompress.jobs.distill import distill_from_args, parse_distill_args

    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(cache), "--data", "stdlib:validation",
                 "--block-size", "32", "--num-blocks", "8", "--hidden-layers", "1", "-q"]) == 0
    common = ["--teacher", str(tiny_reference_dir), "--student_num_layers", "1", "--block_size", "32",
              "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
              "--save_strategy", "no"]
    out = distill_from_args(*parse_distill_args(common + ["--mode", "cache", "--teacher_cache", str(cache),
                                                          "--hidden_weight", "1.0", "--layer_map", "last",
                                                          "--output_dir", str(tmp_path / "cached")]))
    assert (out / "config.json").is_file()
    out = distill_from_args(*parse_distill_args(common + ["--mode", "self", "--num_train_blocks", "8",
                                                          "--dataset", "stdlib:validation",
                                                          "--student_num_layers", "2", "--self_teacher", "ema",
                                                          "--ema_decay", "0.9",
                                                          "--output_dir", str(tmp_path / "self")]))
    assert (out / "config.json").is_file() and (out / "ema" / "config.json").is_file()


@pytest.mark.parametrize("k", [5, 40])
def test_fused_t1_cache_objective_equals_its_composition(k):
    """cache.bucket_forward_kl_t1 (three passes over the vocabulary) gives the loss terms and the logit
    gradient of bucket_logprobs + forward KL + bucket_forward_kl_grad + the cross-entropy gradient, including
    rows whose tail mass is below 1e-3 (recomputed exactly) and k = V (no tail bucket)."""
    from hfcompress.distillation.losses import forward_kl

    g = torch.Generator().manual_seed(k)
    v, n = 40, 12
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    if k < v:
        logits[:3].scatter_(-1, ids[:3], 30.0)  # tiny student tails: the exact recomputation
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64).log_softmax(-1)
    logp = teacher.gather(-1, ids)
    tail = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-12)) if k < v else torch.full((n,), float("-inf"),
                                                                                          dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    kd_w, ce_w = 0.7, 0.4
    weighted, kd, ce, grad = K.bucket_forward_kl_t1(logits.clone(), ids, logp, tail, targets, kd_w, ce_w, True)
    log_q = logits.log_softmax(-1)
    s_b, t_b = K.bucket_logprobs(log_q, ids, logp, tail, v)
    expect_kd = forward_kl(s_b, t_b)
    expect_ce = torch.nn.functional.nll_loss(log_q, targets, reduction="none")
    expect_grad = kd_w * K.bucket_forward_kl_grad(log_q, ids, s_b, t_b) + ce_w * log_q.exp()
    expect_grad[torch.arange(n), targets] -= ce_w
    assert torch.allclose(kd, expect_kd, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ce, expect_ce, rtol=1e-12)
    assert torch.allclose(weighted, kd_w * expect_kd + ce_w * expect_ce, rtol=1e-9)
    assert torch.allclose(grad, expect_grad, rtol=1e-9, atol=1e-12)
    # and the autograd gradient of the composition itself
    leaf = logits.clone().requires_grad_(True)
    lq = leaf.log_softmax(-1)
    sb, tb = K.bucket_logprobs(lq, ids, logp, tail, v)
    (kd_w * forward_kl(sb, tb) + ce_w * torch.nn.functional.nll_loss(lq, targets, reduction="none")).sum().backward()
    assert torch.allclose(grad, leaf.grad, rtol=1e-8, atol=1e-10)


def test_fused_t1_cache_objective_tiny_tails_in_float32():
    """In float32 a tail mass far below the rounding of the row sum cannot come from a difference: those rows are
    recomputed exactly, so the loss and gradient still match the float64 composition."""
    from hfcompress.distillation.losses import forward_kl

    g = torch.Generator().manual_seed(3)
    v, n, k = 300, 6, 8
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logits.scatter_(-1, ids, 25.0)  # student tail ~ 300 e^-25 / 8: ~1e-9 of the row
    logp = torch.full((n, k), -2.2, dtype=torch.float64)
    tail = torch.full((n,), -3.0, dtype=torch.float64)  # the teacher keeps 5% outside: a large p_tail / q_tail
    targets = ids[:, 0]
    _, kd32, _, grad32 = K.bucket_forward_kl_t1(logits.float(), ids, logp.float(), tail.float(), targets, 1.0, 0.5,
                                                True)
    log_q = logits.log_softmax(-1)
    s_b, t_b = K.bucket_logprobs(log_q, ids, logp, tail, v)
    expect = K.bucket_forward_kl_grad(log_q, ids, s_b, t_b) + 0.5 * log_q.exp()
    expect[torch.arange(n), targets] -= 0.5
    assert torch.allclose(kd32.double(), forward_kl(s_b, t_b), rtol=1e-4)
    assert torch.allclose(grad32.double(), expect, rtol=1e-3, atol=1e-6)


def test_rice_codes_round_trip():
    """Rows of small and huge values, k = 1, each row's own parameter; any run of consecutive rows decodes alone."""
    rng = np.random.default_rng(0)
    for k in (1, 5, 64):
        values = np.concatenate([rng.geometric(0.3, (20, k)) - 1, rng.integers(0, 1 << 20, (5, k)),
                                 np.zeros((3, k), dtype=np.int64), rng.integers(0, 40, (7, k))]).astype(np.int64)
        coded = K.rice_encode(values)
        assert len(np.unique(coded["rice_param"])) > 2
        offsets = np.concatenate([[0], np.cumsum(coded["rice_len"].astype(np.int64))])
        assert offsets[-1] == coded["rice_bytes"].size
        assert np.array_equal(K.rice_decode(coded["rice_bytes"], coded["rice_len"], coded["rice_param"], k), values)
        for lo, hi in ((3, 9), (20, 26), (34, 35)):
            part = K.rice_decode(coded["rice_bytes"][offsets[lo]:offsets[hi]], coded["rice_len"][lo:hi],
                                 coded["rice_param"][lo:hi], k)
            assert np.array_equal(part, values[lo:hi])


def test_ranked_rice_rows_round_trip_and_are_smaller_than_fixed_width():
    gen = torch.Generator().manual_seed(1)
    vocab = 5000
    logits = torch.randn(300, vocab, generator=gen) * 2
    logits[:, :300] += 4 * torch.rand(300, generator=gen)  # frequent tokens: in most rows' top-k, ids spread out
    logits[:, torch.randperm(vocab, generator=gen)[:100]] += 3
    top_logp, top_ids = F.log_softmax(logits, -1).topk(64, dim=-1)
    tail = torch.log1p(-top_logp.exp().sum(-1))
    table = K.rank_table(top_ids)
    ranked = K.encode_rows(top_ids, top_logp, tail, vocab, "uint7", table)
    ranked["rank_table"] = table
    fixed = K.encode_rows(top_ids, top_logp, tail, vocab, "uint7")
    rows = np.array([0, 1, 2, 7, 150, 151, 299])
    for arrays in (ranked, fixed):
        ids, stored, _ = K.decode_rows(arrays, rows, 64, "uint7")
        expected = top_ids[rows].sort(-1).values
        assert torch.equal(ids.sort(-1).values, expected)
        # the log-probs stay attached to their ids
        original = torch.full((len(rows), vocab), float("nan")).scatter(-1, top_ids[rows], top_logp[rows])
        assert (stored - original.gather(-1, ids)).abs().max() <= 0.1
    # per-row id bytes (the shard's rank table, 2 bytes per distinct id, is paid once per shard)
    skip = ("logp_codes", "logp_step", "log_tail", "rank_table")
    size = {name: sum(v.nbytes for k, v in arrays.items() if k not in skip)
            for name, arrays in (("ranked", ranked), ("fixed", fixed))}
    assert size["ranked"] < 0.85 * size["fixed"], size


def test_version_1_caches_still_read(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    """A cache in version 1's layout (fixed-width ids, format_version 1, no id_coding field) reads as before and
    gives the rows the ranked-Rice cache of the same data gives."""
    old, new = tmp_path / "v1", tmp_path / "v2"
    K.write_teacher_cache(tiny_teacher, distill_blocks[:4], old, top_k=16, tokenizer=tiny_tokenizer,
                          progress=False, id_coding="fixed")
    meta = json.loads((old / "cache.json").read_text())
    meta["format_version"] = 1
    del meta["id_coding"]
    (old / "cache.json").write_text(json.dumps(meta))
    K.write_teacher_cache(tiny_teacher, distill_blocks[:4], new, top_k=16, tokenizer=tiny_tokenizer, progress=False)
    a, b = K.TeacherCache(old), K.TeacherCache(new)
    assert (a.meta.id_coding, b.meta.id_coding) == ("fixed", "ranked-rice")
    ids_a, logp_a, tail_a = a.rows(torch.tensor([2, 0]))
    ids_b, logp_b, tail_b = b.rows(torch.tensor([2, 0]))
    order_a, order_b = ids_a.argsort(-1), ids_b.argsort(-1)
    assert torch.equal(ids_a.gather(-1, order_a), ids_b.gather(-1, order_b))
    assert torch.allclose(logp_a.gather(-1, order_a), logp_b.gather(-1, order_b), atol=1e-5)
    assert torch.equal(tail_a, tail_b)
    meta["format_version"] = 9
    (old / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(K.TeacherCacheError, match="cache format 9 is not one this version reads"):
        K.TeacherCache(old)


def test_sampled_rows_count_the_draws_and_estimate_the_gradient_without_bias():
    """sample_rows: distinct ids with counts summing to the draws; averaged over many draws, the cache loss's
    logit gradient q - counts/draws equals the live forward-KL gradient q - p within the sampling error."""
    g = torch.Generator().manual_seed(0)
    v, n, draws = 30, 4, 16
    teacher = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    ids, counts = K.sample_rows(teacher, draws, g)
    assert torch.equal(counts.sum(-1), torch.full((n,), draws))
    for row_ids, row_counts in zip(ids, counts):
        held = row_ids[row_counts > 0]
        assert held.unique().numel() == held.numel() and (row_ids[row_counts == 0] == -1).all()
    reps = 4000
    total = torch.zeros(n, v)
    for _ in range(reps):
        ids, counts = K.sample_rows(teacher, draws, g)
        total.scatter_add_(-1, ids.clamp_min(0), counts.float() / draws)
    p = teacher.exp()
    sigma = (p * (1 - p) / (draws * reps)).sqrt()
    assert ((total / reps - p).abs() <= 5 * sigma + 1e-6).all()


def test_sampled_cache_round_trip_and_training(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    """A sampled cache stores distinct ids with counts (padding slots: other ids, no probability), trains a student
    without a teacher, and refuses divergences it does not estimate without bias."""
    out = tmp_path / "sampled"
    meta = K.write_teacher_cache(tiny_teacher, distill_blocks[:4], out, top_k=16, tokenizer=tiny_tokenizer,
                                 progress=False, sampling="sample", seed=3)
    assert (meta.sampling, meta.logprob_format, meta.mean_tail_mass) == ("sample", "counts", 0.0)
    assert 1 <= meta.mean_distinct <= 16
    cache = K.TeacherCache(out)
    ids, logp, tail = cache.rows(torch.tensor([1, 3]))
    assert ids.shape == logp.shape == (2 * (distill_blocks.shape[1] - 1), 16)
    assert all(row.unique().numel() == 16 for row in ids)  # distinct, padding included
    probs = logp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))  # counts / draws; padding 1e-4-free zeros
    assert ((probs * 16 - (probs * 16).round()).abs() < 1e-4).all() and torch.isinf(tail).all()
    again = K.write_teacher_cache(tiny_teacher, distill_blocks[:4], tmp_path / "again", top_k=16,
                                  tokenizer=tiny_tokenizer, progress=False, sampling="sample", seed=3)
    assert again.bytes_per_token == meta.bytes_per_token  # the seed fixes the draws
    student = make_student(tiny_teacher, num_layers=1)
    before = {n: p.clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher_cache=out, processing_class=tiny_tokenizer,
                                  args=config(tmp_path / "run", mode="cache", max_steps=2))
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    with pytest.raises(ConfigError, match="sampled tokens, an unbiased estimate of the forward-KL gradient"):
        DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_cache=out,
                            processing_class=tiny_tokenizer,
                            args=config(tmp_path / "run2", mode="cache", loss="reverse_kl"))
    with pytest.raises(ConfigError, match="use id_coding='ranked-rice'"):
        K.write_teacher_cache(tiny_teacher, distill_blocks[:4], tmp_path / "bad", top_k=16, progress=False,
                              sampling="sample", id_coding="fixed")


def test_tail_rows_draw_outside_the_top_k_and_estimate_the_tail_without_bias():
    """tail_rows: draws only outside each row's top-k, counts summing to the draws; averaged over many draws,
    p_tail x counts / draws equals the teacher's own probability on every tail id (so the cache loss's gradient
    q - p_hat is unbiased for the live q - p), within the sampling error. A row whose tail underflowed to zero
    still draws (distinct tail ids), without failing."""
    g = torch.Generator().manual_seed(0)
    v, n, k, draws = 30, 4, 5, 8
    teacher = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    top = teacher.topk(k, dim=-1).indices
    p = teacher.exp()
    p_tail = 1 - p.gather(-1, top).sum(-1, keepdim=True)
    reps = 4000
    total = torch.zeros(n, v)
    for _ in range(reps):
        ids, counts = K.tail_rows(teacher.clone(), top, draws, g)
        assert torch.equal(counts.sum(-1), torch.full((n,), draws))
        assert not (ids[:, :, None] == top[:, None, :]).any()
        total.scatter_add_(-1, ids.clamp_min(0), p_tail * counts.float() / draws)
    tail_p = p.scatter(-1, top, 0.0)
    sigma = ((tail_p * (p_tail - tail_p)).clamp_min(0) / (draws * reps)).sqrt()  # one draw: p_tail x Bernoulli
    assert total.gather(-1, top).eq(0).all()
    assert ((total / reps - tail_p).abs() <= 5 * sigma + 1e-6).all()
    peaked = torch.full((1, v), -1e4)
    peaked[0, :k] = math.log(1 / k)  # all the mass on the top-k: the tail is empty
    ids, counts = K.tail_rows(peaked.log_softmax(-1), torch.arange(k)[None], draws, g)
    assert counts.sum() == draws and (ids[counts > 0] >= k).all()


def test_tail_draw_cache_round_trip_and_training(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    """A top-k cache with tail draws (format 3): its rows are the plain top-k cache's rows plus the drawn tail
    ids, whose probabilities are the stored tail mass split by the counts (so each row sums to one, with no tail
    bucket left); the seed fixes the draws; it trains a student without a teacher; bad settings are refused."""
    blocks = distill_blocks[:4]
    plain = K.write_teacher_cache(tiny_teacher, blocks, tmp_path / "plain", top_k=16, tokenizer=tiny_tokenizer,
                                  progress=False)
    meta = K.write_teacher_cache(tiny_teacher, blocks, tmp_path / "tail", top_k=16, tokenizer=tiny_tokenizer,
                                 progress=False, tail_draws=8, seed=3, blocks_per_shard=3)
    assert (meta.format_version, meta.tail_draws, meta.sampling) == (3, 8, "top-k")
    assert 16 < meta.mean_distinct <= 24 and meta.bytes_per_token > plain.bytes_per_token
    assert meta.mean_tail_mass == pytest.approx(plain.mean_tail_mass, rel=1e-6)
    top_ids, top_logp, top_tail = K.TeacherCache(tmp_path / "plain").rows(torch.tensor([1, 3]))
    ids, logp, tail = K.TeacherCache(tmp_path / "tail").rows(torch.tensor([1, 3]))
    assert ids.shape == logp.shape == (2 * (blocks.shape[1] - 1), 24) and torch.isinf(tail).all()
    mine, theirs = ids[:, :16].argsort(-1), top_ids.argsort(-1)  # the same top-k (stored in each table's rank order)
    assert torch.equal(ids[:, :16].gather(-1, mine), top_ids.gather(-1, theirs))
    assert torch.allclose(logp[:, :16].gather(-1, mine), top_logp.gather(-1, theirs), atol=1e-5)
    assert all(row.unique().numel() == 24 for row in ids)  # top-k and draws distinct, padding included
    share = (logp[:, 16:] - top_tail[:, None]).exp() * 8  # the counts, padding 0
    assert ((share - share.round()).abs() < 1e-3).all() and torch.allclose(share.sum(-1), torch.full((len(ids),), 8.0))
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(ids)), atol=1e-5)
    again = K.write_teacher_cache(tiny_teacher, blocks, tmp_path / "again", top_k=16, tokenizer=tiny_tokenizer,
                                  progress=False, tail_draws=8, seed=3, blocks_per_shard=3)
    assert torch.equal(K.TeacherCache(tmp_path / "again").rows(torch.tensor([1, 3]))[0], ids)
    student = make_student(tiny_teacher, num_layers=1)  # the error report: the top-k + tail part's gap
    with_draws = K.approximation_error(K.TeacherCache(tmp_path / "tail"), tiny_teacher, student, num_blocks=2)
    without = K.approximation_error(K.TeacherCache(tmp_path / "plain"), tiny_teacher, student, num_blocks=2)
    assert with_draws == pytest.approx(without, rel=1e-4) and 0 < with_draws["relative_gap"] < 1
    student = make_student(tiny_teacher, num_layers=1)
    before = {n: p.clone() for n, p in student.named_parameters()}
    DistillationTrainer(model=student, teacher_cache=tmp_path / "tail", processing_class=tiny_tokenizer,
                        args=config(tmp_path / "run", mode="cache", max_steps=2)).train()
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    with pytest.raises(ConfigError, match="sampled tokens, an unbiased estimate of the forward-KL gradient"):
        DistillationTrainer(model=make_student(tiny_teacher, num_layers=1), teacher_cache=tmp_path / "tail",
                            processing_class=tiny_tokenizer,
                            args=config(tmp_path / "run2", mode="cache", loss="reverse_kl"))
    for bad in (dict(sampling="sample"), dict(id_coding="fixed"), dict(tail_draws=-1)):
        with pytest.raises(ConfigError, match="tail draws are a number >= 0 and go beside a top-k cache"):
            K.write_teacher_cache(tiny_teacher, blocks, tmp_path / "bad", top_k=16, progress=False,
                                  **{"tail_draws": 8, **bad})
    vocab = tiny_teacher.get_output_embeddings().weight.shape[0]
    with pytest.raises(ConfigError, match="the tail is too small to sample"):
        K.write_teacher_cache(tiny_teacher, blocks, tmp_path / "bad", top_k=vocab - 4, progress=False,
                              tail_draws=4)


@pytest.mark.parametrize("draws", [dict(sampling="sample"), dict(tail_draws=12)], ids=["sample", "tail-draws"])
def test_sampled_cache_chunked_loss_equals_the_full_logits_loss(tmp_path, tiny_teacher, tiny_tokenizer,
                                                                distill_blocks, draws):
    """The fused closed form (chunked) on sampled rows (all draws, or top-k + tail draws), whose padding slots
    carry no probability and whose tail is empty: the loss and gradients of the autograd loss on the full logits."""
    out = tmp_path / "sampled"
    K.write_teacher_cache(tiny_teacher, distill_blocks[:12], out, top_k=32, tokenizer=tiny_tokenizer,
                          progress=False, **draws)
    student = make_student(tiny_teacher, num_layers=1)
    batch = _batch(distill_blocks, [5, 1, 9])
    results = []
    for chunk in (0, 7):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_cache=out, processing_class=tiny_tokenizer,
                                      args=config(tmp_path / f"c{chunk}", mode="cache", loss_chunk_size=chunk,
                                                  kd_weight=1.0, ce_weight=0.5))
        loss = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                        if p.grad is not None}))
    (full, full_grads), (chunked, chunked_grads) = results
    assert torch.isfinite(full) and torch.allclose(chunked, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name
