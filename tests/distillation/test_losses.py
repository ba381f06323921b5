"""Loss math against float64 references, and the chunked computation against the plain one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hfcompress.distillation.losses import (
    LMHead,
    LogitLoss,
    chunked_logit_loss,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    logit_loss_from_logits,
    next_token_targets,
    normalize,
    predicted_positions,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
F64 = torch.float64


def logps(*rows):
    return torch.log(torch.tensor(rows, dtype=F64))


def random_logits(n=6, v=11, seed=0, scale=3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=F64) * scale).to(dtype)


def kl_reference(p, q):
    """Σ p log(p/q) in float64 from probabilities (0 log 0 = 0)."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


# ----- identities and asymmetries ------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
def test_identical_distributions_give_zero(loss):
    logits = random_logits()
    value = LogitLoss(loss=loss, temperature=1.7).divergence(logits, logits.clone())
    assert torch.allclose(value, torch.zeros_like(value), atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_divergences_are_positive_for_different_distributions(loss):
    value = LogitLoss(loss=loss).divergence(random_logits(seed=1), random_logits(seed=2))
    assert (value > 1e-3).all()


def test_forward_and_reverse_kl_match_float64_formula():
    student, teacher = random_logits(seed=1).log_softmax(-1), random_logits(seed=2).log_softmax(-1)
    assert torch.allclose(forward_kl(student, teacher), kl_reference(teacher.exp(), student.exp()), atol=1e-12)
    assert torch.allclose(reverse_kl(student, teacher), kl_reference(student.exp(), teacher.exp()), atol=1e-12)
    # Swapping the arguments swaps the two directions; in general they differ.
    assert torch.allclose(forward_kl(teacher, student), reverse_kl(student, teacher))
    assert not torch.allclose(forward_kl(student, teacher), reverse_kl(student, teacher), rtol=1e-2)


def test_forward_kl_covers_modes_and_reverse_kl_seeks_them():
    # Teacher: two modes and a near-impossible token. Student "spread" puts mass on the impossible token;
    # student "one mode" misses the second mode.
    teacher = logps([0.5, 0.5 - 1e-6, 1e-6])
    spread = logps([0.4, 0.4, 0.2])
    one_mode = logps([1 - 2e-6, 1e-6, 1e-6])
    # Forward KL punishes missing a mode (p log p/q with q ~ 1e-6 where p = 0.5) ...
    assert forward_kl(one_mode, teacher).item() > 5 * forward_kl(spread, teacher).item()
    # ... reverse KL punishes mass where the teacher has none (q log q/p with p = 1e-6 where q = 0.2).
    assert reverse_kl(spread, teacher).item() > 2 * reverse_kl(one_mode, teacher).item()
    expected = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / (0.5 - 1e-6)) + 0.2 * math.log(0.2 / 1e-6)
    assert reverse_kl(spread, teacher).item() == pytest.approx(expected, rel=1e-10)


# ----- generalized JSD -----------------------------------------------------------------------------------
def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher = random_logits(seed=3).log_softmax(-1), random_logits(seed=4).log_softmax(-1)
    assert torch.equal(generalized_jsd(student, teacher, 0.0), forward_kl(student, teacher))
    assert torch.equal(generalized_jsd(student, teacher, 1.0), reverse_kl(student, teacher))


@pytest.mark.parametrize("dtype,eps,tol", [(F64, 1e-7, 1e-6), (torch.float32, 1e-4, 1e-3)])
def test_jsd_is_continuous_at_both_ends(dtype, eps, tol):
    # JSD_β/(β(1-β)) = KL(p‖q) + O(β) near 0 and KL(q‖p) + O(1-β) near 1.
    # (Moderate logits: the O(β) term is β·χ²(p‖q)/2, and χ² explodes for peaked, disagreeing distributions.)
    student = random_logits(seed=5, dtype=dtype, scale=1.0).log_softmax(-1)
    teacher = random_logits(seed=6, dtype=dtype, scale=1.0).log_softmax(-1)
    fkl, rkl = forward_kl(student, teacher), reverse_kl(student, teacher)
    assert torch.allclose(generalized_jsd(student, teacher, eps), fkl, rtol=tol, atol=tol)
    assert torch.allclose(generalized_jsd(student, teacher, 1 - eps), rkl, rtol=tol, atol=tol)
    # And it moves monotonically away from the endpoint value as β grows (no jump at small β).
    values = [generalized_jsd(student, teacher, b)[0].item() for b in (eps, 10 * eps, 100 * eps)]
    assert abs(values[1] - values[0]) < abs(values[2] - values[0]) + 1e-12


def test_jsd_at_half_is_four_times_the_jensen_shannon_divergence():
    student, teacher = random_logits(seed=7).log_softmax(-1), random_logits(seed=8).log_softmax(-1)
    p, q = teacher.exp(), student.exp()
    m = 0.5 * (p + q)
    jsd = 0.5 * kl_reference(p, m) + 0.5 * kl_reference(q, m)
    assert torch.allclose(generalized_jsd(student, teacher, 0.5), 4 * jsd, atol=1e-12)
    # Symmetric at β = 0.5 and bounded by 4 ln 2 (JSD <= ln 2).
    assert torch.allclose(generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5))
    far = generalized_jsd(logps([1 - 1e-12, 1e-12]), logps([1e-12, 1 - 1e-12]), 0.5)
    assert far.item() == pytest.approx(4 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.9])
def test_jsd_matches_definition(beta):
    student, teacher = random_logits(seed=9).log_softmax(-1), random_logits(seed=10).log_softmax(-1)
    p, q = teacher.exp(), student.exp()
    m = beta * p + (1 - beta) * q
    expected = (beta * kl_reference(p, m) + (1 - beta) * kl_reference(q, m)) / (beta * (1 - beta))
    assert torch.allclose(generalized_jsd(student, teacher, beta), expected, atol=1e-12)


# ----- skew KL and TVD -----------------------------------------------------------------------------------
def test_skew_kl_definitions_and_limits():
    student, teacher = random_logits(seed=11).log_softmax(-1), random_logits(seed=12).log_softmax(-1)
    p, q = teacher.exp(), student.exp()
    alpha = 0.1
    assert torch.allclose(skew_forward_kl(student, teacher, alpha), kl_reference(p, alpha * p + (1 - alpha) * q),
                          atol=1e-12)
    assert torch.allclose(skew_reverse_kl(student, teacher, alpha), kl_reference(q, alpha * q + (1 - alpha) * p),
                          atol=1e-12)
    assert torch.allclose(skew_forward_kl(student, teacher, 0.0), forward_kl(student, teacher))
    assert torch.allclose(skew_reverse_kl(student, teacher, 0.0), reverse_kl(student, teacher))
    # The mixture keeps at least α of p, so skew KL <= -log α, reached for disjoint supports.
    disjoint = skew_forward_kl(logps([1e-15, 1 - 1e-15]), logps([1 - 1e-15, 1e-15]), alpha)
    assert disjoint.item() == pytest.approx(-math.log(alpha), rel=1e-6)
    assert (skew_forward_kl(student, teacher, alpha) <= -math.log(alpha)).all()


def test_total_variation_bounds():
    student, teacher = random_logits(seed=13).log_softmax(-1), random_logits(seed=14).log_softmax(-1)
    tvd = total_variation(student, teacher)
    assert torch.allclose(tvd, 0.5 * (teacher.exp() - student.exp()).abs().sum(-1))
    assert ((tvd >= 0) & (tvd <= 1)).all()
    assert torch.allclose(tvd, total_variation(teacher, student))
    assert total_variation(logps([1 - 1e-15, 1e-15]), logps([1e-15, 1 - 1e-15])).item() == pytest.approx(1.0)
    # Pinsker: TVD <= sqrt(KL / 2).
    assert (tvd <= torch.sqrt(forward_kl(student, teacher) / 2) + 1e-12).all()


# ----- temperature ---------------------------------------------------------------------------------------
def test_temperature_squared_factor_is_explicit():
    student, teacher = random_logits(seed=15), random_logits(seed=16)
    spec = LogitLoss(loss="forward_kl", temperature=2.0)
    plain = forward_kl((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1))
    assert torch.allclose(spec.divergence(student, teacher), 4.0 * plain)


def test_temperature_scaling_keeps_gradients_independent_of_temperature():
    # For large T, d(T² KL_T)/dz_s = T (q_T − p_T) → (Δ − mean Δ)/V with Δ = z_s − z_t (Hinton et al. 2015, §2.1).
    v = 11
    student, teacher = random_logits(n=4, v=v, seed=17, scale=1.0), random_logits(n=4, v=v, seed=18, scale=1.0)
    delta = student - teacher
    limit = (delta - delta.mean(-1, keepdim=True)) / v
    for t in (50.0, 500.0):
        z = student.clone().requires_grad_(True)
        LogitLoss(loss="forward_kl", temperature=t).divergence(z, teacher).sum().backward()
        assert torch.allclose(z.grad, limit, rtol=0.1 * 50 / t, atol=1e-3 * 50 / t)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_objective_mixes_distillation_and_cross_entropy(temperature):
    student, teacher = random_logits(seed=19), random_logits(seed=20)
    targets = torch.tensor([0, 3, 5, 7, 9, 10])
    weighted, kd, ce = LogitLoss(loss="forward_kl", temperature=temperature, kd_weight=0.3,
                                 ce_weight=0.6).per_position(student, teacher, targets)
    p = (teacher / temperature).softmax(-1)
    expected_kd = temperature ** 2 * kl_reference(p, (student / temperature).softmax(-1))
    expected_ce = -student.log_softmax(-1)[torch.arange(6), targets]  # always at T = 1
    assert torch.allclose(kd, expected_kd, atol=1e-12) and torch.allclose(ce, expected_ce, atol=1e-12)
    assert torch.allclose(weighted, 0.3 * expected_kd + 0.6 * expected_ce, atol=1e-12)


# ----- positions ---------------------------------------------------------------------------------------------
def test_ignored_labels_are_excluded():
    labels = torch.tensor([[5, 6, -100, 7, 8], [-100, -100, 1, 2, -100]])
    mask = predicted_positions(labels)
    # Position t predicts labels[t+1]; the last position never predicts.
    assert mask.tolist() == [[True, False, True, True, False], [False, True, True, False, False]]
    assert next_token_targets(labels, mask).tolist() == [6, 7, 8, 1, 2]


def test_normalize_uses_the_step_count_when_given():
    total = torch.tensor(12.0)
    assert normalize(total, None, 4).item() == 3.0
    assert normalize(total, torch.tensor(6), 4).item() == 2.0
    assert normalize(torch.tensor(0.0), None, 0).item() == 0.0  # empty micro-batch stays finite


# ----- chunked == unchunked ----------------------------------------------------------------------------------
def _setup(n=23, hs=8, ht=12, v=17, dtype=F64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, hs, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    teacher_hidden = torch.randn(n, ht, generator=g, dtype=F64).to(dtype)
    ws = torch.randn(v, hs, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    bs = torch.randn(v, generator=g, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    wt, bt = torch.randn(v, ht, generator=g, dtype=F64).to(dtype), torch.randn(v, generator=g, dtype=F64).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return student_hidden, teacher_hidden, ws, bs, wt, bt, targets


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.5), (5, 1.0), (0, 2.0)])
def test_chunked_equals_unchunked_loss_and_gradients(loss, chunk_size, temperature):
    h, ht, ws, bs, wt, bt, y = _setup()
    spec = LogitLoss(loss=loss, temperature=temperature, kd_weight=0.7, ce_weight=0.4)
    student_head, teacher_head = LMHead(ws, bs, scale=0.9, softcap=6.0), LMHead(wt, bt, scale=0.9, softcap=6.0)
    chunked = chunked_logit_loss(h, student_head, y, spec, ht, teacher_head, chunk_size=chunk_size)
    grads_chunked = torch.autograd.grad(2.5 * chunked[0], [h, ws, bs])
    full = logit_loss_from_logits(student_head.logits(h, ws, bs), teacher_head.logits(ht, wt, bt), y, spec)
    grads_full = torch.autograd.grad(2.5 * full[0], [h, ws, bs])
    for a, b in zip(chunked, full):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_chunked, grads_full):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_chunked_float32_and_cross_entropy_only():
    h, ht, ws, _, wt, _, y = _setup(dtype=torch.float32, bias=False)
    spec = LogitLoss(loss="forward_kl", kd_weight=0.0, ce_weight=1.0)
    total, kd, ce = chunked_logit_loss(h, LMHead(ws), y, spec, chunk_size=4)  # no teacher at all
    expected = torch.nn.functional.cross_entropy(h @ ws.T, y, reduction="sum")
    assert kd.item() == 0.0
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad_chunked,) = torch.autograd.grad(total, [ws])
    (grad_full,) = torch.autograd.grad(expected, [ws])
    assert torch.allclose(grad_chunked, grad_full, rtol=1e-4, atol=1e-6)


def test_chunked_without_grad_and_teacher_argument_check():
    h, ht, ws, bs, wt, bt, y = _setup()
    with torch.no_grad():
        total, _, _ = chunked_logit_loss(h, LMHead(ws, bs), y, LogitLoss(), ht, LMHead(wt, bt), chunk_size=4)
    assert not total.requires_grad
    with pytest.raises(ValueError):
        chunked_logit_loss(h, LMHead(ws), y, LogitLoss(), ht, None)


# ----- hidden states -----------------------------------------------------------------------------------------
def test_hidden_state_losses():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    mse = hidden_state_loss([a, a], [b, a], "mse")
    assert mse.item() == pytest.approx(((a - b) ** 2).mean(-1).sum().item() / 2)
    cosine = hidden_state_loss([a], [b], "cosine")
    expected = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum()
    assert cosine.item() == pytest.approx(expected.item())
    assert hidden_state_loss([a], [3 * a], "cosine").item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    with pytest.raises(ValueError):
        hidden_state_loss([a], [b], "l1")


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (1.0, 0.6), (2.5, 0.6), (0.7, 0.0)])
def test_closed_form_logit_gradient_matches_autograd(loss, temperature, ce_weight):
    """per_position_and_grad's hand-written gradient == autograd through per_position, in float64."""
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(9, 13, generator=g, dtype=F64) * 3
    zt = torch.randn(9, 13, generator=g, dtype=F64) * 3
    y = torch.randint(0, 13, (9,), generator=g)
    spec = LogitLoss(loss=loss, temperature=temperature, kd_weight=0.8, ce_weight=ce_weight)
    assert spec.has_closed_form(with_teacher=True)
    leaf = zs.clone().requires_grad_(True)
    weighted, kd, ce = spec.per_position(leaf, zt, y)
    (expected,) = torch.autograd.grad(weighted.sum(), [leaf])
    weighted2, kd2, ce2, grad = spec.per_position_and_grad(zs.clone(), zt.clone(), y)
    for a, b in ((weighted, weighted2), (kd, kd2), (ce, ce2)):
        assert torch.allclose(a.detach(), b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)
    # cross-entropy only (no teacher): q - e_y scaled by ce_weight
    _, _, _, grad_ce = LogitLoss(ce_weight=0.3).per_position_and_grad(zs.clone(), None, y)
    assert torch.allclose(grad_ce, 0.3 * (torch.softmax(zs, -1) - F.one_hot(y, 13)), atol=1e-12)
    assert not LogitLoss(loss="jsd").has_closed_form(with_teacher=True)


def test_chunked_with_ignored_targets_uses_autograd_path():
    """Targets of -100 (never passed by the trainer, but possible for direct callers) are ignored, as in
    the full-logits reference."""
    h, ht, ws, bs, wt, bt, y = _setup()
    y = y.clone()
    y[::3] = -100
    spec = LogitLoss(kd_weight=0.0, ce_weight=1.0)
    chunked = chunked_logit_loss(h, LMHead(ws, bs), y, spec, chunk_size=4)
    full = logit_loss_from_logits(LMHead(ws, bs).logits(h, ws, bs), None, y, spec)
    assert torch.allclose(chunked[0], full[0], rtol=1e-10)
