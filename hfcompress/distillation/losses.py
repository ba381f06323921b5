"""Distillation losses as pure functions of tensors.

Conventions: ``p`` is the teacher's next-token distribution, ``q`` the student's; functions take log-probs
``(N, V)`` (one row per predicted position) and return a per-position value ``(N,)``. Reductions (sum over
positions, division by the number of predicted tokens of the optimizer step) are done by the caller, so the
normalisation is correct under gradient accumulation and data parallelism.

Memory: :func:`chunked_logit_loss` never holds more than ``chunk_size`` rows of ``(·, V)`` logits: it
projects the final hidden states through each model's LM head chunk by chunk, and takes each chunk's
gradient immediately (an autograd.Function whose backward only rescales the stored gradients). This is
gradient checkpointing per chunk without the recomputation: the chunk's logits, softmaxes and their
autograd graph are freed before the next chunk, and backward does not recompute the two LM-head matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import native

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------
# Divergences between next-token distributions, per position
# --------------------------------------------------------------------------------------------------------
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q): mode-covering; the classic KD objective (Hinton et al. 2015)."""
    return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)  # (N,)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) = Σ_v q (log q − log p): mode-seeking (MiniLLM, Gu et al. 2024)."""
    return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)  # (N,)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD (GKD, Agarwal et al. 2024, Eq. 1) normalised by 1/(β(1−β)).

    ``JSD_β = β KL(p ‖ m) + (1−β) KL(q ‖ m)`` with ``m = β p + (1−β) q``. Since ``JSD_β = β KL(p‖q) + O(β²)``
    as β→0 and ``(1−β) KL(q‖p) + O((1−β)²)`` as β→1, the normalised value
    ``KL(p‖m)/(1−β) + KL(q‖m)/β`` tends to the forward KL at β=0 and to the reverse KL at β=1, so the loss
    is continuous in β on [0, 1] (unnormalised JSD_β vanishes at both ends). At β=0.5 it is 4·JSD.

    ``log m − log q = log((1−β) + β p/q)`` is computed as ``logaddexp(log(1−β), log β + log p − log q)``: it
    stays accurate for small β, where the two KL terms' first-order parts cancel.
    """
    if beta <= 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta >= 1.0:
        return reverse_kl(student_logp, teacher_logp)
    log_beta = torch.tensor(math.log(beta), dtype=student_logp.dtype, device=student_logp.device)
    log_1m_beta = torch.tensor(math.log1p(-beta), dtype=student_logp.dtype, device=student_logp.device)
    log_ratio = teacher_logp - student_logp  # log p − log q, (N, V)
    log_m_over_q = torch.logaddexp(log_1m_beta, log_beta + log_ratio)
    log_m_over_p = torch.logaddexp(log_beta, log_1m_beta - log_ratio)
    kl_p_m = -(teacher_logp.exp() * log_m_over_p).sum(-1)  # KL(p ‖ m)
    kl_q_m = -(student_logp.exp() * log_m_over_q).sum(-1)  # KL(q ‖ m)
    return kl_p_m / (1.0 - beta) + kl_q_m / beta


def _log_mixture(logp_a: torch.Tensor, logp_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(α a + (1−α) b) from log a and log b."""
    if alpha <= 0.0:
        return logp_b
    return torch.logaddexp(logp_a + math.log(alpha), logp_b + math.log1p(-alpha))


def skew_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL: KL(p ‖ α p + (1−α) q) (DistiLLM, Ko et al. 2024, Eq. 4); α=0 is the forward KL."""
    log_m = _log_mixture(teacher_logp, student_logp, alpha)
    return F.kl_div(log_m, teacher_logp, reduction="none", log_target=True).sum(-1)


def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL: KL(q ‖ α q + (1−α) p) (DistiLLM, Ko et al. 2024, Eq. 5); α=0 is the reverse KL."""
    log_m = _log_mixture(student_logp, teacher_logp, alpha)
    return F.kl_div(log_m, student_logp, reduction="none", log_target=True).sum(-1)


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """TVD = ½ Σ_v |p − q| ∈ [0, 1] (Wen et al. 2023, f-divergence KD)."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


# --------------------------------------------------------------------------------------------------------
# The objective of one position: distillation at temperature T plus cross-entropy on the label
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitLoss:
    """Hyper-parameters of the logit objective (see ``DistillationConfig`` for their meaning)."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    beta: float = 0.5
    skew_alpha: float = 0.1

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``T² · D(p_T ‖ q_T)`` per position, (N,).

        The T² factor (Hinton et al. 2015, §2) keeps gradient magnitudes independent of T: the gradient of
        ``D`` w.r.t. the student logits scales like 1/T² for large T, so without it a higher temperature would
        silently lower the effective weight of the distillation term.
        """
        t = self.temperature
        student_logp = F.log_softmax(student_logits / t, dim=-1)  # (N, V)
        teacher_logp = F.log_softmax(teacher_logits / t, dim=-1)
        return self._divergence(student_logp, teacher_logp)

    def _divergence(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if self.loss == "forward_kl":
            value = forward_kl(student_logp, teacher_logp)
        elif self.loss == "reverse_kl":
            value = reverse_kl(student_logp, teacher_logp)
        elif self.loss == "jsd":
            value = generalized_jsd(student_logp, teacher_logp, self.beta)
        elif self.loss == "skew_forward_kl":
            value = skew_forward_kl(student_logp, teacher_logp, self.skew_alpha)
        elif self.loss == "skew_reverse_kl":
            value = skew_reverse_kl(student_logp, teacher_logp, self.skew_alpha)
        elif self.loss == "tvd":
            value = total_variation(student_logp, teacher_logp)
        else:
            raise ValueError(f"unknown logit loss {self.loss!r}")
        return (t * t) * value

    def per_position(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted objective, distillation term, cross-entropy term), each (N,)."""
        if self.kd_weight == 0 or teacher_logits is None:
            ce = F.cross_entropy(student_logits, targets, reduction="none")  # (N,)
            return self.ce_weight * ce, torch.zeros_like(ce), ce
        t = self.temperature
        student_logp = F.log_softmax(student_logits / t if t != 1.0 else student_logits, dim=-1)  # (N, V)
        teacher_logp = F.log_softmax(teacher_logits / t if t != 1.0 else teacher_logits, dim=-1)
        kd = self._divergence(student_logp, teacher_logp)
        if t == 1.0:  # reuse the student's log-probs: one (N, V) tensor less per chunk
            ce = F.nll_loss(student_logp, targets, reduction="none")
        else:
            ce = F.cross_entropy(student_logits, targets, reduction="none")
        return self.kd_weight * kd + self.ce_weight * ce, kd, ce

    # Losses whose gradient w.r.t. the student's logits :meth:`per_position_and_grad` writes in closed form.
    CLOSED_FORM = ("forward_kl", "reverse_kl")

    def kernel_loss(self, with_teacher: bool) -> str | None:
        """The fused kernel's name for this objective (``"none"``: cross-entropy only), None if it has none."""
        if not with_teacher or self.kd_weight == 0:
            return "none"
        if self.loss == "jsd":  # β = 0 and 1 are the forward and reverse KL (see generalized_jsd)
            return "forward_kl" if self.beta <= 0 else "reverse_kl" if self.beta >= 1 else "jsd"
        return self.loss if self.loss in self.CLOSED_FORM else None

    def fused_kernel_applies(self, logits_dtype: torch.dtype, device: torch.device, with_teacher: bool) -> bool:
        """Whether :meth:`per_position_and_grad` with ``overwrite=True`` runs hfcompress's fused CPU kernel on
        logits of this dtype and device (float32 on CPU, with the kernel built)."""
        return (torch.device(device).type == "cpu" and logits_dtype == torch.float32
                and self.kernel_loss(with_teacher) is not None and native.kd_logit_loss_available())

    def has_closed_form(self, with_teacher: bool) -> bool:
        return not with_teacher or self.kd_weight == 0 or self.loss in self.CLOSED_FORM

    def per_position_and_grad(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                              targets: torch.Tensor, need_grad: bool = True, overwrite: bool = False):
        """:meth:`per_position` plus the gradient of ``weighted.sum()`` w.r.t. ``student_logits`` (N, V),
        without autograd (None when ``need_grad`` is False). Only where :meth:`has_closed_form`, or where the
        fused kernel applies.

        ``overwrite=True`` lets the gradient be written over ``student_logits`` (contiguous; the caller no
        longer needs them): float32 CPU logits then go through hfcompress's fused kernel
        (``hfcompress::kd_logit_loss``, three or four sweeps per row instead of about ten passes over the
        chunk) when it is built; it also covers the generalized JSD (see :meth:`fused_kernel_applies`).

        With q = softmax(z/T), p = softmax(z_teacher/T), q₁ = softmax(z), e_y the label's one-hot:

        * ``T²·KL(p‖q)``: gradient ``T (q − p)`` (the T² cancels one 1/T of the chain rule; Hinton et al.);
        * ``T²·KL(q‖p)``: gradient ``T q ⊙ (log q − log p − KL(q‖p))``;
        * cross-entropy: gradient ``q₁ − e_y``;
        * (fused kernel only) normalised generalized JSD: gradient ``−(T/β) q ⊙ (l − Σ q l)``, l = log(m/q).

        The (N, V) buffers are updated in place: about half the passes over them that autograd makes.
        """
        with_teacher = teacher_logits is not None
        if overwrite and self.fused_kernel_applies(student_logits.dtype, student_logits.device, with_teacher):
            kind = self.kernel_loss(with_teacher)
            logits = student_logits.contiguous()  # the gradient goes here
            kd, ce = native.kd_logit_loss(logits, teacher_logits.contiguous() if kind != "none" else None, targets,
                                          kind, self.temperature, self.kd_weight, self.ce_weight, need_grad,
                                          self.beta)
            return self.kd_weight * kd + self.ce_weight * ce, kd, ce, logits if need_grad else None
        rows = torch.arange(student_logits.shape[0], device=student_logits.device)
        t = self.temperature
        if self.kd_weight == 0 or teacher_logits is None:
            log_q1 = F.log_softmax(student_logits, dim=-1)
            ce = -log_q1[rows, targets]
            grad = None
            if need_grad:
                grad = log_q1.exp_().mul_(self.ce_weight)
                grad[rows, targets] -= self.ce_weight
            return self.ce_weight * ce, torch.zeros_like(ce), ce, grad
        log_q = F.log_softmax(student_logits / t if t != 1.0 else student_logits, dim=-1)  # (N, V)
        log_p = F.log_softmax(teacher_logits / t if t != 1.0 else teacher_logits, dim=-1)
        # The cross-entropy is logged even at ce_weight 0, as per_position does.
        log_q1 = log_q if t == 1.0 else F.log_softmax(student_logits, dim=-1)
        ce = -log_q1[rows, targets]
        kd_scale = self.kd_weight * t  # d(kd_weight T² D)/dz = kd_weight T² (1/T) dD/d(z/T)
        ce_in_q = self.ce_weight if t == 1.0 else 0.0  # at T = 1 the cross-entropy's q₁ is q itself
        grad = None
        if self.loss == "forward_kl":
            kd = (t * t) * forward_kl(log_q, log_p)
            if need_grad:  # (kd_scale + ce_in_q) q − kd_scale p, in place over log q and log p
                grad = log_q.exp_().mul_(kd_scale + ce_in_q).sub_(log_p.exp_(), alpha=kd_scale)
        elif self.loss == "reverse_kl":
            diff = log_q - log_p  # log q − log p
            q = log_q.exp_()
            raw = (q * diff).sum(-1)  # KL(q‖p) per position
            kd = (t * t) * raw
            if need_grad:  # kd_scale q (diff − KL) + ce_in_q q
                grad = diff.sub_(raw[:, None]).mul_(kd_scale).add_(ce_in_q).mul_(q)
        else:
            raise ValueError(f"no closed-form gradient for loss {self.loss!r}")
        if need_grad and self.ce_weight:
            if t != 1.0:
                grad.add_(log_q1.exp_(), alpha=self.ce_weight)
            grad[rows, targets] -= self.ce_weight
        return self.kd_weight * kd + self.ce_weight * ce, kd, ce, grad


# --------------------------------------------------------------------------------------------------------
# Positions: causal shift and ignored labels
# --------------------------------------------------------------------------------------------------------
def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T) mask of positions whose next token is a target: position t predicts ``labels[t+1]``.

    The last position predicts nothing, and neither does a position whose next label is ``-100``.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def next_token_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The targets of the positions in ``mask`` (see :func:`predicted_positions`), (N,)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted[mask]


def normalize(total: torch.Tensor, num_items_in_batch, local_count: torch.Tensor | int) -> torch.Tensor:
    """Divide a summed loss by the number of predicted tokens.

    With ``num_items_in_batch`` (the Trainer's count over all micro-batches of the optimizer step, and over
    all ranks when ``average_tokens_across_devices``) the per-micro-batch losses add up to the mean over the
    whole step, whatever the split. Without it, the local mean (at least 1 to keep empty batches finite).
    """
    if num_items_in_batch is None:
        denominator = torch.as_tensor(local_count, device=total.device).clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / denominator.to(total.dtype)


# --------------------------------------------------------------------------------------------------------
# Logit losses from full logits (reference) and chunked from hidden states (memory-lean)
# --------------------------------------------------------------------------------------------------------
def logit_loss_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                           targets: torch.Tensor, spec: LogitLoss) -> tuple[torch.Tensor, ...]:
    """Sums over positions of (objective, distillation, cross-entropy) from full (N, V) logits.

    The straightforward computation (float32 at least); reference for :func:`chunked_logit_loss`.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher = None if teacher_logits is None else teacher_logits.to(dtype)
    weighted, kd, ce = spec.per_position(student_logits.to(dtype), teacher, targets)
    return weighted.sum(), kd.sum().detach(), ce.sum().detach()


@dataclass
class LMHead:
    """What turns final hidden states (N, H) into logits (N, V): ``softcap(scale · (h Wᵀ + b))``.

    ``scale`` covers Cohere-style ``logit_scale``; ``softcap`` Gemma-style ``c·tanh(x/c)``.
    """

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(N, V) logits, at least float32 (a bf16/fp16 ``hidden @ weight.T`` is widened before the transforms)."""
        out = hidden @ weight.T  # (N, V)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if bias is not None:
            out = out + bias
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out

    def grad_before_transforms(self, logits: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """Chain rule through softcap and scale: gradient w.r.t. ``h Wᵀ + b`` from that w.r.t. the
        :meth:`logits` output (updated in place). With z = c·tanh(u/c), dz/du = 1 − (z/c)²."""
        if self.softcap is not None:
            grad_logits.mul_(1.0 - (logits / self.softcap).square())
        if self.scale != 1.0:
            grad_logits.mul_(self.scale)
        return grad_logits


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``device``'s type (e.g. bf16 under ``Trainer(bf16=True)``),
    or None when autocast is off there."""
    kind = torch.device(device).type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type autocast does not know
        return None
    return None


class _ChunkedLogitLoss(torch.autograd.Function):
    """Sum over positions of the objective, chunk by chunk, with each chunk's gradient taken immediately.

    Under autocast (mixed-precision training on a GPU, or CPU bf16 autocast) the chunk's precision is chosen
    here rather than op by op: the two logit products run in autocast's dtype, as the models' own LM heads would
    (float32 accumulation), and everything after them — softmaxes, divergences, the gradient w.r.t. the logits
    and the gradient products — in float32. Left to autocast, the gradient products would meet bf16 logits
    (``mm(out=float32)`` fails) and the fused CPU kernel, which takes float32 logits only, would be skipped.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                targets, student_head, teacher_head, spec, chunk_size, per_position=None):
        matmul_dtype = autocast_dtype(student_hidden.device)
        with torch.autocast(device_type=student_hidden.device.type, enabled=False):
            return _ChunkedLogitLoss._forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden,
                                              teacher_weight, teacher_bias, targets, student_head, teacher_head,
                                              spec, chunk_size, matmul_dtype, per_position)

    @staticmethod
    def _forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 targets, student_head, teacher_head, spec, chunk_size, matmul_dtype=None, per_position=None):
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        mm = matmul_dtype or dtype  # the logit products' dtype
        want = ctx.needs_input_grad[:3]  # student hidden, weight, bias
        # One cast of each head for the whole batch, not one per chunk (a (V, H) copy each time otherwise).
        ws = student_weight.detach().to(dtype).requires_grad_(want[1])
        ws_mm = ws if mm == dtype else student_weight.detach().to(mm)  # closed form: no graph through it
        bs = None if student_bias is None else student_bias.detach().to(dtype).requires_grad_(want[2])
        wt = None if teacher_hidden is None else teacher_weight.detach().to(mm)
        bt = None if teacher_bias is None else teacher_bias.detach().to(dtype)
        grad_hidden = torch.zeros_like(student_hidden, dtype=dtype) if want[0] else None  # (N, Hs)
        # (V, Hs): the first closed-form chunk writes it (no zero fill of a vocabulary-sized matrix).
        grad_ws = torch.empty_like(ws) if want[1] else None
        grad_ws_written = False
        grad_bs = torch.zeros_like(bs) if want[2] else None
        total = torch.zeros((), dtype=dtype, device=student_hidden.device)
        kd_total, ce_total = total.clone(), total.clone()
        n = student_hidden.shape[0]
        step = chunk_size if chunk_size and chunk_size > 0 else max(n, 1)
        # Forward/reverse KL and cross-entropy have closed-form logit gradients: no autograd graph per chunk. On
        # CPU in float32, the fused kernel computes them (and the JSD's) in place of the logits; softcapping's
        # chain rule reads the logits, so the gradient may replace them only without it.
        # A caller's ``per_position`` (an objective of the chunk's logits and rows) returns its logit gradient.
        with_teacher = teacher_hidden is not None
        fused = per_position is None and student_head.softcap is None and \
            spec.fused_kernel_applies(dtype, student_hidden.device, with_teacher)
        closed_form = per_position is not None or ((fused or spec.has_closed_form(with_teacher))
                                                   and bool((targets >= 0).all()))
        for start in range(0, n, step):
            end = min(start + step, n)
            teacher_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    teacher_logits = teacher_head.logits(teacher_hidden[start:end].to(mm), wt, bt)  # (C, V) float32
            if closed_form:
                with torch.no_grad():
                    hs = student_hidden[start:end].detach().to(dtype)
                    student_logits = student_head.logits(hs.to(mm), ws_mm, bs)  # (C, V) float32
                    if per_position is None:
                        weighted, kd, ce, grad_logits = spec.per_position_and_grad(
                            student_logits, teacher_logits, targets[start:end], need_grad=any(want), overwrite=fused)
                    else:
                        weighted, kd, ce, grad_logits = per_position(student_logits, start, end, any(want))
                    chunk_total = weighted.sum()
                    if grad_logits is not None:
                        g = student_head.grad_before_transforms(student_logits, grad_logits)  # (C, V)
                        if want[0]:
                            torch.mm(g, ws, out=grad_hidden[start:end])
                        if want[1]:
                            if grad_ws_written:
                                grad_ws.addmm_(g.t(), hs)
                            else:
                                torch.mm(g.t(), hs, out=grad_ws)
                                grad_ws_written = True
                        if want[2]:
                            grad_bs += g.sum(0)
                    del grad_logits
            else:
                hs = student_hidden[start:end].detach().to(dtype).requires_grad_(want[0])
                with torch.enable_grad():
                    student_logits = student_head.logits(hs.to(mm), ws.to(mm), bs)  # (C, V) float32
                    weighted, kd, ce = spec.per_position(student_logits, teacher_logits, targets[start:end])
                    chunk_total = weighted.sum()
                inputs = [t for t, w in ((hs, want[0]), (ws, want[1]), (bs, want[2])) if w]
                if inputs:
                    grads = iter(torch.autograd.grad(chunk_total, inputs))
                    if want[0]:
                        grad_hidden[start:end] = next(grads)
                    if want[1]:
                        if grad_ws_written:
                            grad_ws += next(grads)
                        else:
                            grad_ws.copy_(next(grads))
                            grad_ws_written = True
                    if want[2]:
                        grad_bs += next(grads)
            total += chunk_total.detach()
            kd_total += kd.detach().sum()
            ce_total += ce.detach().sum()
            del student_logits, teacher_logits, weighted, kd, ce, chunk_total  # free the chunk before the next
        if grad_ws is not None and not grad_ws_written:  # no chunk had a gradient (e.g. no positions)
            grad_ws.zero_()
        ctx.save_for_backward(grad_hidden, grad_ws, grad_bs)
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype,
                            None if student_bias is None else student_bias.dtype)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_hidden, grad_ws, grad_bs = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.input_dtypes
        out_hidden = None if grad_hidden is None else (grad_total * grad_hidden).to(hidden_dtype)
        out_ws = None if grad_ws is None else (grad_total * grad_ws).to(weight_dtype)
        out_bs = None if grad_bs is None else (grad_total * grad_bs).to(bias_dtype)
        return out_hidden, out_ws, out_bs, None, None, None, None, None, None, None, None, None


def chunked_logit_loss(student_hidden: torch.Tensor, student_head: LMHead, targets: torch.Tensor, spec: LogitLoss,
                       teacher_hidden: torch.Tensor | None = None, teacher_head: LMHead | None = None,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over positions of (objective, distillation, cross-entropy) from final hidden states.

    ``student_hidden`` (N, Hs) and ``teacher_hidden`` (N, Ht) are the LM heads' inputs at the N predicted
    positions, ``targets`` (N,) their next tokens. At most ``chunk_size`` rows of logits exist at a time
    (0 = all at once). The objective is differentiable w.r.t. ``student_hidden`` and the student head's
    weight/bias; the two other sums are for logging. Equal to :func:`logit_loss_from_logits` on the full
    logits, up to float rounding.
    """
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass both teacher_hidden and teacher_head, or neither")
    return _ChunkedLogitLoss.apply(
        student_hidden, student_head.weight, student_head.bias,
        teacher_hidden, None if teacher_head is None else teacher_head.weight,
        None if teacher_head is None else teacher_head.bias,
        targets, student_head, teacher_head, spec, chunk_size,
    )


def chunked_head_loss(student_hidden: torch.Tensor, student_head: LMHead, per_position,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_logit_loss` for an objective the caller computes from each chunk of student logits.

    ``per_position(student_logits (C, V) float32, start, end, need_grad)`` returns (weighted objective,
    distillation, cross-entropy), each (C,), for positions ``start:end`` of ``student_hidden`` (N, H), and the
    gradient of the weighted objective's sum w.r.t. ``student_logits`` (C, V) (None without ``need_grad``; it must
    not overwrite ``student_logits``): the teacher signal is the caller's, e.g. the rows of a teacher cache
    (:class:`~.modes.CachedTeacher`). As in :func:`chunked_logit_loss`, at most ``chunk_size`` rows of (·, V)
    logits exist at a time and backward only rescales the gradients stored in forward.
    """
    return _ChunkedLogitLoss.apply(student_hidden, student_head.weight, student_head.bias, None, None, None, None,
                                   student_head, None, None, chunk_size, per_position)


# --------------------------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------------------------
def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                      kind: str = "cosine") -> torch.Tensor:
    """Sum over positions of the per-position hidden-state loss, averaged over the layer pairs.

    ``student_states[i]`` (N, H) is already projected to the width of ``teacher_states[i]`` (N, H).
    ``mse``: mean over the hidden dimension of the squared difference (TinyBERT, Jiao et al. 2020, Eq. 7);
    ``cosine``: 1 − cos(student, teacher) (DistilBERT's cosine embedding loss, Sanh et al. 2019).
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError("hidden_state_loss needs the same non-zero number of student and teacher states")
    total = 0.0
    for student, teacher in zip(student_states, teacher_states):
        dtype = torch.promote_types(student.dtype, torch.float32)
        student, teacher = student.to(dtype), teacher.to(dtype)
        if kind == "mse":
            per_position = (student - teacher).pow(2).mean(-1)  # (N,)
        elif kind == "cosine":
            per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
        else:
            raise ValueError(f"unknown hidden-state loss {kind!r}")
        total = total + per_position.sum()
    return total / len(student_states)
