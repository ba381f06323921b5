"""Offline (teacher cache), online and self distillation: each mode does what it says, not the live default."""

from __future__ import annotations

import copy
import functools

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
    with pytest.raises(ConfigError, match="hidden_weight"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], mode="cache", hidden_weight=1.0)


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

    assert main(["truncate", str(tiny_reference_dir), str(tmp_path / "short"), "--layers", "1"]) == 0
    assert json.loads((tmp_path / "short" / "config.json").read_text())["num_hidden_layers"] == 1
    assert main(["truncate", str(tiny_reference_dir), str(tmp_path / "long"), "--layers", "3"]) != 0
    assert "the model has 2" in capsys.readouterr().err


def test_distill_script_runs_the_cache_and_self_modes(tmp_path, tiny_reference_dir, capsys):
    from hfcompress.cli import main
    from hfcompress.jobs.distill import distill_from_args, parse_distill_args

    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(tiny_reference_dir), "--out", str(cache), "--data", "stdlib:validation",
                 "--block-size", "32", "--num-blocks", "8", "-q"]) == 0
    common = ["--teacher", str(tiny_reference_dir), "--student_num_layers", "1", "--block_size", "32",
              "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
              "--save_strategy", "no"]
    out = distill_from_args(*parse_distill_args(common + ["--mode", "cache", "--teacher_cache", str(cache),
                                                          "--output_dir", str(tmp_path / "cached")]))
    assert (out / "config.json").is_file()
    out = distill_from_args(*parse_distill_args(common + ["--mode", "self", "--num_train_blocks", "8",
                                                          "--dataset", "stdlib:validation",
                                                          "--student_num_layers", "2",
                                                          "--output_dir", str(tmp_path / "self")]))
    assert (out / "config.json").is_file()
