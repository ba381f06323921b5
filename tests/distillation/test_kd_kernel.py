"""hfcompress's fused distillation loss kernel (csrc/kd_loss.cpp) against float64 references.

The kernel computes, per row, ``T² D(p_T ‖ q_T)`` (forward or reverse KL), the cross-entropy at T = 1, and
overwrites the student's logits with the gradient of ``kd_weight · kd + ce_weight · ce``. Its sums are
float32 and its exponential is within ~2 ulp, so it must agree with the float64 closed form
(``LogitLoss.per_position_and_grad`` on float64 logits, itself tested against autograd) to float32
rounding: relative ~1e-6 per term, a few times V·eps at most for the sums.
"""

from __future__ import annotations

import pytest
import torch

from hfcompress.core import native
from hfcompress.distillation.losses import LMHead, LogitLoss, chunked_logit_loss

pytestmark = pytest.mark.skipif(not native.kd_logit_loss_available(), reason="native kernels could not be built")

F64 = torch.float64


def logits(rows, vocab, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g) * scale
    teacher = student + torch.randn(rows, vocab, generator=g) * scale / 2
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return student, teacher, targets


def reference(spec, student, teacher, targets):
    """(kd, ce, grad) in float64: the closed form (which test_losses checks against autograd), or autograd
    through the generalized JSD's definition."""
    teacher64 = None if teacher is None else teacher.double()
    if spec.kernel_loss(teacher is not None) == "jsd":
        leaf = student.double().requires_grad_(True)
        weighted, kd, ce = spec.per_position(leaf, teacher64, targets)
        (grad,) = torch.autograd.grad(weighted.sum(), [leaf])
        return kd.detach(), ce.detach(), grad
    _, kd, ce, grad = spec.per_position_and_grad(student.double(), teacher64, targets)
    return kd, ce, grad


def assert_matches(spec, student, teacher, targets, kind):
    kd64, ce64, grad64 = reference(spec, student, teacher, targets)
    out = student.clone()
    kd, ce = native.kd_logit_loss(out, teacher, targets, kind, spec.temperature, spec.kd_weight, spec.ce_weight,
                                  need_grad=True, beta=spec.beta)
    vocab = student.shape[1]
    tol = 8 * vocab ** 0.5 * torch.finfo(torch.float32).eps  # float32 sums of V terms, rounding ~ sqrt(V) eps
    t2 = spec.temperature ** 2
    # the JSD's l = log((1 − β) + β p/q) carries the rounding of log β and log(1 − β), divided by β
    floor = t2 * (1.0 / spec.beta if kind == "jsd" else 1e-3)
    assert ((kd.double() - kd64).abs() <= tol * (kd64.abs() + floor)).all(), (kd, kd64)
    assert ((ce.double() - ce64).abs() <= tol * (ce64.abs() + 1.0)).all()
    scale = spec.kd_weight * spec.temperature + spec.ce_weight  # the gradient's entries are at most ~this
    if kind in ("reverse_kl", "jsd"):  # q (l − mean) subtracts a mean of the size of D: float32 keeps ~eps·|D|
        scale = scale * (1.0 + kd64.abs()[:, None] / t2) / (spec.beta if kind == "jsd" else 1.0)
    assert ((out.double() - grad64).abs() <= tol * scale).all(), (out.double() - grad64).abs().max()


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.05),
                                       ("jsd", 0.9)])
@pytest.mark.parametrize("temperature,kd_weight,ce_weight", [(1.0, 1.0, 0.0), (2.0, 1.0, 0.5), (1.0, 0.7, 0.5),
                                                             (0.6, 0.3, 0.0)])
@pytest.mark.parametrize("vocab", [1, 13, 1000, 4099])  # vector tails: V mod 16 and mod 8 != 0
def test_kernel_matches_float64_reference(loss, beta, temperature, kd_weight, ce_weight, vocab):
    student, teacher, targets = logits(7, vocab, seed=vocab)
    spec = LogitLoss(loss=loss, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, beta=beta)
    assert_matches(spec, student, teacher, targets, loss)


def test_jsd_endpoints_go_to_the_kl_kernels_and_bad_beta_is_refused():
    assert LogitLoss(loss="jsd", beta=0.0).kernel_loss(True) == "forward_kl"
    assert LogitLoss(loss="jsd", beta=1.0).kernel_loss(True) == "reverse_kl"
    assert LogitLoss(loss="tvd").kernel_loss(True) is None
    assert LogitLoss(loss="tvd").kernel_loss(False) == "none"
    student, teacher, targets = logits(2, 30, seed=9)
    with pytest.raises(RuntimeError, match="beta must be in"):
        native.kd_logit_loss(student.clone(), teacher, targets, "jsd", 1.0, 1.0, 0.0, True, beta=1.0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kernel_cross_entropy_only(temperature):
    student, _, targets = logits(9, 777, seed=1)
    spec = LogitLoss(kd_weight=0.0, ce_weight=0.8, temperature=temperature)
    out = student.clone()
    kd, ce = native.kd_logit_loss(out, None, targets, "none", temperature, 0.0, 0.8, need_grad=True)
    assert torch.equal(kd, torch.zeros(9))
    expected = torch.nn.functional.cross_entropy(student.double(), targets, reduction="none")
    assert torch.allclose(ce.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.double(), reference(spec, student, None, targets)[2], atol=1e-6)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_give_zero(loss):
    student, _, targets = logits(5, 300, seed=2)
    out = student.clone()
    kd, _ = native.kd_logit_loss(out, student.clone(), targets, loss, 1.5, 1.0, 0.0, need_grad=True, beta=0.3)
    if loss == "jsd":  # log((1 − β) + β·1) is 0 only up to the rounding of log(β) and log(1 − β)
        assert kd.abs().max().item() < 1e-6 and out.abs().max().item() < 1e-6
    else:  # log p − log q is exactly 0 and the KLs are exactly 0
        assert torch.equal(kd, torch.zeros(5))
        assert out.abs().max().item() < 1e-7  # q − p = 0 up to one rounding of each exp


def test_extreme_logits_stay_finite_and_accurate():
    """Entries far below the row maximum (probabilities that underflow float32) and a near one-hot row."""
    student, teacher, targets = logits(4, 257, seed=3)
    student[0, ::2] = -1e4
    teacher[1, 7] = 500.0
    student[2] *= 40
    teacher[3, :] = -3e4
    teacher[3, 11] = 0.0  # the teacher is sure of token 11
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        spec = LogitLoss(loss=loss, temperature=1.0, kd_weight=1.0, ce_weight=0.5, beta=0.2)
        kd64, _, _ = reference(spec, student, teacher, targets)
        assert torch.isfinite(kd64).all()
        assert_matches(spec, student, teacher, targets, loss)


def test_nan_logits_give_nan_not_a_silent_number():
    student, teacher, targets = logits(3, 64, seed=4)
    student[1, 5] = float("nan")
    kd, _ = native.kd_logit_loss(student.clone(), teacher, targets, "forward_kl", 1.0, 1.0, 0.0, need_grad=False)
    assert torch.isnan(kd[1]) and torch.isfinite(kd[[0, 2]]).all()


def test_without_grad_the_logits_are_untouched():
    student, teacher, targets = logits(3, 100, seed=5)
    out = student.clone()
    for loss in ("forward_kl", "reverse_kl", "none"):
        native.kd_logit_loss(out, None if loss == "none" else teacher, targets, loss, 2.0, 1.0, 0.5,
                             need_grad=False)
        assert torch.equal(out, student)


def test_thread_count_does_not_change_bits():
    student, teacher, targets = logits(37, 2000, seed=6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            out = student.clone()
            kd, ce = native.kd_logit_loss(out, teacher, targets, "forward_kl", 2.0, 1.0, 0.5, need_grad=True)
            results.append((kd, ce, out))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_inputs_are_refused_with_the_reason():
    student, teacher, targets = logits(3, 50, seed=7)
    op = native.kd_logit_loss
    with pytest.raises(RuntimeError, match="target 50 of row 1 is outside"):
        op(student.clone(), teacher, torch.tensor([0, 50, 1]), "forward_kl", 1.0, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="float32"):
        op(student.double(), teacher, targets, "forward_kl", 1.0, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="teacher logits"):
        op(student.clone(), teacher[:, :49].contiguous(), targets, "forward_kl", 1.0, 1.0, 0.0, True)
    with pytest.raises(RuntimeError, match="temperature"):
        op(student.clone(), teacher, targets, "forward_kl", 0.0, 1.0, 0.0, True)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_chunked_loss_uses_the_kernel_and_agrees_with_the_eager_path(monkeypatch, loss):
    """The trainer's chunked loss on float32: the fused kernel vs HFCOMPRESS_NATIVE_KERNELS=0 (eager ATen; for
    the JSD, autograd through its definition)."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(70, 32, generator=g).requires_grad_(True)
    teacher_hidden = torch.randn(70, 48, generator=g)
    ws = (torch.randn(515, 32, generator=g) * 0.3).requires_grad_(True)
    wt = torch.randn(515, 48, generator=g) * 0.3
    targets = torch.randint(0, 515, (70,), generator=g)
    spec = LogitLoss(loss=loss, temperature=2.0, kd_weight=1.0, ce_weight=0.5, beta=0.4)
    calls = []
    real = native.kd_logit_loss
    monkeypatch.setattr(native, "kd_logit_loss", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        total, kd, ce = chunked_logit_loss(hidden, LMHead(ws, scale=0.8), targets, spec, teacher_hidden,
                                           LMHead(wt, scale=0.8), chunk_size=32)
        return (total, kd, ce, *torch.autograd.grad(total, [hidden, ws]))

    fused = run()
    assert len(calls) == 3  # 70 rows in chunks of 32
    monkeypatch.setenv("HFCOMPRESS_NATIVE_KERNELS", "0")
    eager = run()
    assert len(calls) == 3
    for a, b in zip(fused, eager):
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-5 * float(b.abs().max()))
