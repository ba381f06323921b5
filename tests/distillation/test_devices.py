"""Distillation under mixed precision and on any device: the chunked loss under bf16 autocast (CPU autocast
here, the GPU's in ``-m cuda``), the trainer's loss counters and its LM-head access."""

from __future__ import annotations

import pytest
import torch

from hfcompress import DistillationConfig, DistillationTrainer, make_student
from hfcompress.core.data import BlockDataset
from hfcompress.distillation.losses import LMHead, LogitLoss, autocast_dtype, chunked_logit_loss, logit_loss_from_logits


def bf16_logits(hidden, weight):
    """Logits whose value is the bf16 product (what the head computes under autocast) and whose gradient is the
    float32 one (what the chunked loss computes from them)."""
    exact = hidden @ weight.T
    return exact + ((hidden.detach().bfloat16() @ weight.detach().bfloat16().T).float() - exact).detach()


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_chunked_loss_under_bf16_autocast(loss):
    """Under autocast the logit products run in bf16 (as the models' own heads would) and the rest in float32:
    the loss equals the float32 loss of bf16 logits, and the gradients match within float32 rounding (the
    autograd-only losses' backward products run in bf16 like autocast's, within bf16 rounding)."""
    torch.manual_seed(0)
    n, h, v = 48, 32, 300
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (0.5 * torch.randn(v, h)).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(n, h), 0.5 * torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    spec = LogitLoss(loss=loss, kd_weight=0.7, ce_weight=0.3, temperature=2.0)
    reference = logit_loss_from_logits(bf16_logits(hidden, weight), bf16_logits(teacher_hidden, teacher_weight),
                                       targets, spec)
    reference_grads = torch.autograd.grad(reference[0], [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(hidden.device) == torch.bfloat16
        got = chunked_logit_loss(hidden, LMHead(weight), targets, spec, teacher_hidden, LMHead(teacher_weight),
                                 chunk_size=16)
    assert autocast_dtype(hidden.device) is None
    assert all(t.dtype == torch.float32 for t in got)
    for ours, theirs in zip(got, reference):
        assert torch.allclose(ours, theirs, rtol=1e-5)
    grads = torch.autograd.grad(got[0], [hidden, weight])
    tolerance = 1e-4 if spec.has_closed_form(True) or spec.kernel_loss(True) else 2e-2
    for ours, theirs in zip(grads, reference_grads):
        assert ours.dtype == torch.float32
        assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max()


def test_trainer_steps_under_bf16_autocast(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    """``bf16=True`` (autocast) with the chunked loss: finite losses, counters that add up, the head check passes."""
    student = make_student(tiny_teacher, num_layers=1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                              per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                              save_strategy="no", loss_chunk_size=16, bf16=True, max_steps=3, kd_weight=0.5,
                              ce_weight=0.5, hidden_weight=0.0)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args,
                                  train_dataset=BlockDataset(distill_blocks[:24]), processing_class=tiny_tokenizer)
    assert trainer._chunked and trainer._components["train"].dtype == torch.float64
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert all(torch.isfinite(torch.tensor(entry[key])) for key in ("loss", "kd_loss", "ce_loss"))
        # the objective is 0.5 kd + 0.5 ce per token (bf16 forward, float32 loss: a loose match)
        assert entry["loss"] == pytest.approx(0.5 * entry["kd_loss"] + 0.5 * entry["ce_loss"], rel=0.05)
    assert not trainer._check_heads  # the first step compared our head with the models' own logits


@pytest.mark.cuda
def test_trainer_steps_on_cuda_in_bf16(tmp_path, tiny_teacher, tiny_tokenizer, distill_blocks):
    student = make_student(tiny_teacher, num_layers=1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], disable_tqdm=True, seed=0,
                              per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                              save_strategy="no", loss_chunk_size=16, bf16=True, max_steps=3)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_teacher, args=args,
                                  train_dataset=BlockDataset(distill_blocks[:24]), processing_class=tiny_tokenizer)
    trainer.train()
    assert trainer._components["train"].device.type == "cuda"
    assert next(trainer.teacher_model.parameters()).device.type == "cuda"
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 3 and all(entry["kd_loss"] >= 0 for entry in logged)


def test_fsdp1_falls_back_to_full_logits_and_fsdp2_keeps_the_chunked_loss(caplog):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hfcompress.distillation.trainer import _student_head_unreadable

    def accelerator(kind, version=None):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            fsdp_version=version)))

    assert not _student_head_unreadable(accelerator(DistributedType.NO))
    assert not _student_head_unreadable(accelerator(DistributedType.FSDP, 2))
    assert not caplog.records
    assert _student_head_unreadable(accelerator(DistributedType.FSDP, 1))
    assert "FSDP1" in caplog.text and "fsdp_version 2" in caplog.text


def test_sharded_lm_head_is_gathered_and_gets_its_gradient(tmp_path, tiny_llama):
    """FSDP2 shards the head as a DTensor: ``lm_head`` gathers it with a differentiable ``full_tensor()``, so the
    chunked loss's gradient reaches the sharded parameter (one process, gloo: the plumbing, not the speed)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from hfcompress.distillation.teachers import lm_head

    torch.manual_seed(0)
    hidden = torch.randn(10, tiny_llama.config.hidden_size)
    targets = torch.randint(0, 100, (10,))
    spec = LogitLoss(loss="forward_kl", kd_weight=0.0, ce_weight=1.0)
    plain = tiny_llama.lm_head.weight
    expected = torch.autograd.grad(chunked_logit_loss(hidden, lm_head(tiny_llama, 100), targets, spec,
                                                      chunk_size=4)[0], plain)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        tiny_llama.lm_head.weight = torch.nn.Parameter(distribute_tensor(plain.detach(), mesh, [Shard(0)]))
        head = lm_head(tiny_llama, 100)
        assert not isinstance(head.weight, DTensor) and torch.equal(head.weight, plain[:100])
        chunked_logit_loss(hidden, head, targets, spec, chunk_size=4)[0].backward()
        grad = tiny_llama.lm_head.weight.grad
        assert isinstance(grad, DTensor)
        assert torch.allclose(grad.full_tensor(), expected, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()
