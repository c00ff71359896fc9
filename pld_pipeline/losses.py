"""Distillation losses: Plackett-Luce (PLD), KD, DIST and CE, from full teacher logits or a top-k cache.

Every loss takes the teacher through :class:`TeacherTargets`, which holds exactly what the cache stores
(top-k ranking, log-probabilities, log-partition at one temperature). Built from full logits with
``k = C`` it is lossless, so the cached and the online paths run the same code.

PLD (arXiv 2506.12542): the target ranking is the true label first, then the other classes by descending
teacher logit (ties: lower class index first). Step k costs ``logsumexp(s over classes not yet chosen) -
s[pi_k]`` weighted by ``softmax(t / T)[pi_k]`` (not renormalised). From a top-k ranking the loss is the
exact first K' steps: the classes outside the head enter only through one masked logsumexp ``R``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss_names import BUILTIN_LOSSES
from .teacher_order import teacher_order

__all__ = [
    "TeacherTargets", "pld_loss", "pld_loss_from_ranking", "kd_loss", "dist_loss", "ce_loss",
    "PLDLoss", "LOSSES", "LossEntry", "MixedLabels", "create_loss", "get_loss", "register_loss",
]

Reduction = Literal["mean", "sum", "none"]


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"Unsupported reduction '{reduction}'. Use one of: mean, sum, none.")


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Accumulate in float32 under bf16/fp16 autocast; keep float64 for gradcheck and references.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


_NON_FINITE_TEACHER = "teacher_logits contain NaN or Inf; check the teacher checkpoint and its inputs."


def _check_student(student_logits: Tensor, labels: Tensor, num_classes: int | None = None, *,
                   teacher: Tensor | None = None) -> None:
    """Shapes and dtypes, then every value check of the call at once: labels in [0, C) and, given ``teacher``
    (logits, or the sorted logits' first and last columns, which hold any NaN or Inf), a finite teacher."""
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [batch, classes], got shape {tuple(student_logits.shape)}.")
    batch, classes = student_logits.shape
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [batch={batch}], got shape {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}.")
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"student has {classes} classes but the teacher targets have {num_classes}; "
            "build the student with the teacher's num_classes.")
    if not batch:
        return
    bad_labels = ((labels < 0) | (labels >= classes)).any()
    bad = bad_labels if teacher is None else bad_labels | ~torch.isfinite(teacher).all()
    _refuse(bad, f"labels must lie in [0, {classes})" + ("" if teacher is None else " and teacher_logits be finite"),
            lambda: (f"labels must lie in [0, {classes}), got min {int(labels.min())} max {int(labels.max())}."
                     if bool(bad_labels) else _NON_FINITE_TEACHER))


def _refuse(bad: Tensor, message: str, explain: Callable[[], str]) -> None:
    """Refuse a call whose value checks, folded into one 0-dim bool ``bad``, failed: one check per call.

    Eager on CPU: one host read (CPU ops run synchronously, so it costs nothing) and a ValueError with
    ``explain()``, which may read the inputs again to name the offending values. On CUDA and under
    ``torch.compile``: a device-side assert with ``message`` (a RuntimeError when the step's result is next
    read), so a GPU never waits on the host and a compiled kernel stays one graph. Never a silent result."""
    if bad.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad, message)
    elif bool(bad):
        raise ValueError(explain())


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's side of a distillation loss for one batch, at one temperature.

    ``topk_idx[b]`` lists K classes by descending teacher logit (K may equal C); ``topk_logp`` and
    ``label_logp`` are ``log_softmax(t)`` at temperature 1 (shift-invariant, so no raw logits are needed);
    ``logz = logsumexp(log_softmax(t) / T)`` turns them into exact probabilities at temperature T:
    ``p = exp(logp / T - logz)``.
    """

    topk_idx: Tensor
    topk_logp: Tensor
    label_logp: Tensor
    logz: Tensor
    temperature: float
    num_classes: int

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if self.topk_idx.ndim != 2 or self.topk_logp.shape != self.topk_idx.shape:
            raise ValueError(
                f"topk_idx and topk_logp must both be [batch, k], got {tuple(self.topk_idx.shape)} "
                f"and {tuple(self.topk_logp.shape)}.")
        batch, k = self.topk_idx.shape
        if self.label_logp.shape != (batch,) or self.logz.shape != (batch,):
            raise ValueError(
                f"label_logp and logz must be [batch={batch}], got {tuple(self.label_logp.shape)} "
                f"and {tuple(self.logz.shape)}.")
        if k < 1 or k > self.num_classes:
            raise ValueError(f"k must lie in [1, num_classes={self.num_classes}], got k={k}.")

    @classmethod
    def from_logits(
            cls, teacher_logits: Tensor, labels: Tensor, *, k: int | None = None, temperature: float = 1.0,
    ) -> "TeacherTargets":
        """Exact targets from full teacher logits; ``k=None`` keeps all C classes (lossless)."""
        _check_temperature(temperature)
        if teacher_logits.ndim != 2:
            raise ValueError(f"teacher_logits must be [batch, classes], got {tuple(teacher_logits.shape)}.")
        num_classes = teacher_logits.shape[1]
        k = num_classes if k is None else int(k)
        if not 1 <= k <= num_classes:
            raise ValueError(f"k must lie in [1, num_classes={num_classes}], got k={k}.")
        t = teacher_logits.detach().to(_compute_dtype(teacher_logits))
        _check_student(t, labels, teacher=t)
        logp = torch.log_softmax(t, dim=1)
        # A stable order of tied logits (lower class index first); topk() does not pin one.
        order = teacher_order(t)[:, :k]
        return cls(
            topk_idx=order,
            topk_logp=logp.gather(1, order),
            label_logp=logp.gather(1, labels[:, None].long()).squeeze(1),
            logz=torch.logsumexp(logp / temperature, dim=1),
            temperature=float(temperature),
            num_classes=num_classes,
        )

    @classmethod
    def ensemble(cls, members: list["TeacherTargets"]) -> "TeacherTargets":
        """Several teachers' targets for the same views, their probabilities at T averaged per view, ranked anew.

        Full mode (every k = C): exact. From top-k members: each member's probability of a class outside its
        top-k is unknown and counted as 0, so every averaged probability is a lower bound, short by at most the
        mean of the members' tail masses (the stored ``1 - sum(top-k)``); the result keeps the top-k classes of
        that average and the label's exact average. The result is expressed at temperature T directly
        (``topk_logp = T * log p``, ``logz = 0``), so every loss reads it like any cached target."""
        first = members[0]
        temp, c = first.temperature, first.num_classes
        if any(m.temperature != temp or m.num_classes != c for m in members):
            raise ValueError("Ensemble members must share the temperature and the number of classes.")
        dtype = _compute_dtype(first.topk_logp)
        probs = torch.zeros(first.topk_idx.shape[0], c, dtype=dtype, device=first.topk_idx.device)
        for m in members:
            probs.scatter_add_(1, m.topk_idx.long(), m.topk_log_probs().to(dtype).exp())
        probs /= len(members)
        k = min(m.k for m in members)
        top = torch.sort(probs, dim=1, descending=True, stable=True)  # ties: lower class index first
        order = top.indices[:, :k]
        label_p = torch.stack([m.label_log_prob().to(dtype).exp() for m in members]).mean(0)
        tiny = torch.finfo(dtype).tiny  # a class no member ranks gets a lower bound of 0: keep its log finite
        return cls(topk_idx=order, topk_logp=temp * top.values[:, :k].clamp_min(tiny).log(),
                   label_logp=temp * label_p.clamp_min(tiny).log(), logz=torch.zeros_like(label_p),
                   temperature=temp, num_classes=c)

    @property
    def k(self) -> int:
        return self.topk_idx.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TeacherTargets":
        move = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return TeacherTargets(move(self.topk_idx), move(self.topk_logp), move(self.label_logp),
                              move(self.logz), self.temperature, self.num_classes)

    def topk_log_probs(self) -> Tensor:
        """log p_T of the top-k classes, exact: ``logp / T - logz``."""
        dtype = _compute_dtype(self.topk_logp)
        return self.topk_logp.to(dtype) / self.temperature - self.logz.to(dtype)[:, None]

    def label_log_prob(self) -> Tensor:
        dtype = _compute_dtype(self.label_logp)
        return self.label_logp.to(dtype) / self.temperature - self.logz.to(dtype)

    def tail_mass(self) -> Tensor:
        """Teacher probability (at T) outside the top-k: what a top-k cache leaves unranked."""
        return (1.0 - self.topk_log_probs().exp().sum(1)).clamp_min(0.0)

    def dense_probs(self) -> Tensor:
        """[B, C] teacher probabilities at T: exact on the top-k, the tail mass spread evenly over the
        rest (the maximum-entropy fill; exact when k = C). Only DIST needs a dense vector."""
        top = self.topk_log_probs().exp()
        rest = self.num_classes - self.k
        fill = self.tail_mass() / rest if rest else torch.zeros_like(top[:, 0])
        dense = fill[:, None].expand(-1, self.num_classes)
        return dense.scatter(1, self.topk_idx.long(), top)


@dataclass(frozen=True)
class MixedLabels:
    """Labels of a batch with mixed views (CutMix/Mixup, cached by ``cache-teacher --mix``): the batch's own
    ``labels`` weigh ``lam``, the partners' ``other`` labels ``1 - lam`` (plain views: lam = 1, other = label)."""
    other: Tensor  # int [B]
    lam: Tensor  # float [B]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MixedLabels":
        return MixedLabels(self.other.to(device, non_blocking=non_blocking),
                           self.lam.to(device, non_blocking=non_blocking))

    def dominant(self, labels: Tensor) -> Tensor:
        """The label with the larger weight (ties: the sample's own): what the cache ranks first."""
        return torch.where(2 * self.lam >= 1, labels.long(), self.other.long())


def _label_ce(s: Tensor, labels: Tensor, mix: MixedLabels | None) -> Tensor:
    """Per-sample cross-entropy on the true label, or on the lambda-mixed pair (timm's mixed one-hot target)."""
    ce = F.cross_entropy(s, labels.long(), reduction="none")
    if mix is None:
        return ce
    lam = mix.lam.to(s.dtype)
    return lam * ce + (1.0 - lam) * F.cross_entropy(s, mix.other.long(), reduction="none")


#: Widest spread of student logits within a row for which the cumulative sums can run in exp space in the
#: compute dtype: every exp(s - max) that matters stays a normal number (float32: exp(-87) is the smallest normal;
#: float64: exp(-708)) and the backward's products stay finite. Rows past it, rare, take logcumsumexp.
_EXP_SPACE_MAX_SPREAD = {torch.float32: 60.0, torch.float64: 600.0}


def _where_rare(rare: Tensor, exact: Callable[[], tuple[Tensor, ...]], fast: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``fast`` with the rows flagged in ``rare`` [B] taken from ``exact()``, which runs only when a row is flagged.

    Eager on CPU: a Python branch (reading the flag costs nothing: CPU ops run synchronously). Under
    ``torch.compile``: ``torch.cond``, so the kernel stays one graph with no host sync in it. Eager on CUDA, where
    reading the flag would stall the GPU: ``exact()`` always runs and its rows are selected on the device."""
    def patched() -> tuple[Tensor, ...]:
        return tuple(torch.where(rare.view(-1, *[1] * (f.ndim - 1)), x, f) for x, f in zip(exact(), fast))

    if torch.compiler.is_compiling():
        return tuple(torch.cond(rare.any(), patched, lambda: tuple(f.clone() for f in fast), ()))
    return patched() if rare.is_cuda or bool(rare.any()) else fast


def _reverse_cumsum(x: Tensor) -> Tensor:
    return x.flip(1).cumsum(1).flip(1)


def _reverse_logcumsumexp(x: Tensor) -> Tensor:
    return torch.logcumsumexp(x.flip(1), dim=1).flip(1)


class _PlackettLuceHead(torch.autograd.Function):
    """Per-sample NLL of the first steps of a weighted Plackett-Luce ranking: ``head_idx`` [B, K+1] lists the
    classes of the steps in order (slots with ``valid`` False take no step and weigh ``alpha`` 0: the top-k
    slot that repeats the label); the classes outside the head enter through their logsumexp ``R``.

    Forward: ``D_k = log(exp(R) + sum_{j>=k, valid} exp(s_head_j))``, ``L = sum_k alpha_k (D_k - s_head_k)``.
    Backward, closed form: ``dL/ds_head_j = exp(s_head_j) * sum_{k<=j} alpha_k exp(-D_k) - alpha_j``, and for a
    class c outside the head (present in every suffix) ``exp(s_c) * sum_k alpha_k exp(-D_k)``. Everything runs in
    exp space shifted by the row's maximum ``hi``: over B x C one max, one exp (no -inf in it: masked entries are
    zeroed after, exp of -inf is a slow path), one sum forward and one product backward, against plain KD's
    four exps. A row whose smallest suffix falls below ``exp(-spread limit)`` (see ``_EXP_SPACE_MAX_SPREAD``),
    where exp leaves the normal range, takes logcumsumexp instead. A rest class whose exp(s - hi) leaves the
    normal range has a true gradient below ``exp(limit - 87)`` (2e-12 in float32): computed as 0 or subnormal.
    """

    @staticmethod
    def forward(ctx, s: Tensor, head_idx: Tensor, valid: Tensor, alpha: Tensor) -> Tensor:  # type: ignore[override]
        dtype = _compute_dtype(s)
        ctx.in_dtype = s.dtype  # before the cast: the gradient goes back in the student's dtype (bf16 under autocast)
        s, alpha = s.to(dtype), alpha.to(dtype)
        hi = s.amax(1, keepdim=True)
        rest_e = (s - hi).exp_().scatter_(1, head_idx, 0.0)  # exp(s - hi) outside the head, 0 inside
        e_rest = rest_e.sum(1, keepdim=True)  # exp(R - hi); 0 when the head covers every class
        z = s.gather(1, head_idx) - hi
        e = z.exp() * valid
        suffix = _reverse_cumsum(e) + e_rest  # exp(D - hi): falls along the slots, its last is its least
        wide = suffix[:, -1] < math.exp(-_EXP_SPACE_MAX_SPREAD[dtype])

        def exact() -> tuple[Tensor]:
            rest_lse = torch.logsumexp(s.scatter(1, head_idx, -math.inf), dim=1, keepdim=True)
            d = torch.logaddexp(_reverse_logcumsumexp((z + hi).masked_fill(~valid, -math.inf)), rest_lse)
            return ((d - hi).masked_fill_(~valid, 0.0),)  # a slot without a step: any finite value (alpha 0)

        log_suffix, = _where_rare(wide, exact, (suffix.log(),))
        loss = torch.linalg.vecdot(alpha, log_suffix - z)
        ctx.save_for_backward(s, head_idx, valid, alpha, z, e, suffix, log_suffix, wide, hi, rest_e)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        s, head_idx, valid, alpha, z, e, suffix, log_suffix, wide, hi, rest_e = ctx.saved_tensors
        cum_w = (alpha / suffix).cumsum_(1)  # sum_{k<=j} alpha_k exp(hi - D_k)
        fast = (e * cum_w - alpha, rest_e * cum_w[:, -1:])

        def exact() -> tuple[Tensor, Tensor]:
            log_w = torch.where(alpha > 0, alpha.log() - log_suffix, -math.inf)  # alpha_k exp(hi - D_k), logged
            g = torch.exp(z + torch.logcumsumexp(log_w, dim=1)) - alpha
            rest = s.scatter(1, head_idx, -math.inf) - hi
            return g, torch.exp(rest + torch.logsumexp(log_w, dim=1, keepdim=True))

        g_head, g_rest = _where_rare(wide, exact, fast)
        g_out = grad_loss.to(alpha.dtype)[:, None]
        g = (g_rest * g_out).scatter_add_(1, head_idx, g_head.masked_fill_(~valid, 0.0) * g_out)
        return g.to(ctx.in_dtype), None, None, None


def _label_position(order: Tensor, labels: Tensor) -> Tensor:
    """[B, 1] position of each row's label in ``order`` (a whole ranking holds every class exactly once)."""
    return (order == labels[:, None]).max(1, keepdim=True).indices


class _PlackettLuceFull(torch.autograd.Function):
    """Per-sample PLD loss over a whole ranking, given in teacher order with the label anywhere in it.

    The target ranking is [label, then the teacher order without the label]. Working in teacher order needs no
    permuted copy: step 0 costs ``alpha_y * (D_0 - s_y)`` with ``D_0 = logsumexp(s)``; every other class at
    teacher position j costs ``alpha_j * (D_j - s_j)`` with ``D_j`` the logsumexp of the positions >= j *except
    the label's*. In exp space, with ``z = s - max``, ``e = exp(z)`` (label zeroed) and ``S`` its reversed
    cumulative sum, ``D_j - s_j = log S_j - z_j``, and the backward is one forward cumulative sum:
    ``dL/ds_j = e_j * (alpha_y / S'_0 + sum_{k<=j} alpha_k / S_k) - alpha_j`` (``S'_0`` counts the label too);
    the label gets ``alpha_y (softmax(s)_y - 1)``. The label is removed by scatters at its position (B
    elements), not masks over B x C. Takes the weights as probabilities, so ``pld_loss`` gets them from one
    softmax (one exp over B x C, where log-probabilities would need two), and the label's position ``pos`` [B, 1]
    in ``order``. Rows whose smallest ``S`` falls below ``exp(-spread limit)`` (see ``_EXP_SPACE_MAX_SPREAD``),
    where exp leaves the normal range, take logcumsumexp instead (a weight below float's normal range then counts
    as 0: its terms are bounded by the weight itself).
    """

    @staticmethod
    def forward(ctx, s: Tensor, order: Tensor, labels: Tensor, pos: Tensor, alpha: Tensor, alpha_y: Tensor) -> Tensor:  # type: ignore[override]
        dtype = _compute_dtype(s)
        ctx.in_dtype = s.dtype  # before the cast: the gradient goes back in the student's dtype
        s, alpha_y = s.to(dtype), alpha_y.to(dtype)
        alpha = alpha.to(dtype).scatter(1, pos, 0.0)  # the label's own slot takes no later step
        s_y = s.gather(1, labels[:, None]).squeeze(1)
        hi = s.amax(1)
        z = s.gather(1, order).sub_(hi[:, None])  # in place: each fresh B x C tensor costs its page faults too
        e = z.exp().scatter_(1, pos, 0.0)
        suffix = e.flip(1).cumsum_(1).flip(1)
        e_y = torch.exp(s_y - hi)
        suffix0 = suffix[:, 0] + e_y  # exp(D_0 - max): every class
        suffix.scatter_(1, pos, 1.0)  # keeps the label's slot (alpha 0) finite
        # S falls along the ranking, so its last two entries (one may be the label's 1) hold its minimum: below
        # exp(-max spread) some e_j left the normal range and the row's 1/S sums could overflow.
        wide = suffix[:, -2:].amin(1) < math.exp(-_EXP_SPACE_MAX_SPREAD[dtype])
        fast = ((alpha * suffix.log().sub_(z)).sum(1) + alpha_y * (suffix0.log() + hi - s_y),
                e_y / suffix0)  # the loss, softmax(s)_y

        def exact() -> tuple[Tensor, Tensor]:
            s_o = s.gather(1, order)
            d = _reverse_logcumsumexp(s_o.scatter(1, pos, -math.inf))
            d0 = torch.logaddexp(d[:, 0], s_y)
            loss = torch.linalg.vecdot(alpha, (d - s_o).scatter_(1, pos, 0.0)) + alpha_y * (d0 - s_y)
            return loss, torch.exp(s_y - d0)

        loss, label_p = _where_rare(wide, exact, fast)
        ctx.save_for_backward(s, order, pos, alpha, alpha_y, e, suffix, suffix0, label_p, wide)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        s, order, pos, alpha, alpha_y, e, suffix, suffix0, label_p, wide = ctx.saved_tensors
        w = alpha / suffix  # alpha_k exp(max - D_k)
        w[:, 0] += alpha_y / suffix0  # step 0 (the label) reaches every class
        fast = (w.cumsum_(1).mul_(e).sub_(alpha),)

        def exact() -> tuple[Tensor]:
            s_o = s.to(alpha.dtype).gather(1, order)
            s_y = s_o.gather(1, pos).squeeze(1)
            s_o = s.gather(1, order)
            d = _reverse_logcumsumexp(s_o.scatter(1, pos, -math.inf))
            log_w = alpha.log() - d  # the label's slot: alpha 0, log -inf
            log_w0 = alpha_y.log() - torch.logaddexp(d[:, 0], s_y)
            cum_log = torch.logaddexp(torch.logcumsumexp(log_w, dim=1), log_w0[:, None])
            return (torch.exp(s_o + cum_log) - alpha,)

        g_o, = _where_rare(wide, exact, fast)
        # the label: only step 0 reaches it (absent from every later suffix)
        g_o = g_o.scatter_(1, pos, (alpha_y * (label_p - 1.0))[:, None]).mul_(grad_loss.to(alpha.dtype)[:, None])
        g = torch.empty_like(g_o).scatter_(1, order, g_o)
        return g.to(ctx.in_dtype), None, None, None, None, None


def _log_weights(logp: Tensor, logz: Tensor, temperature: float) -> Tensor:
    """``logp / T - logz``: the teacher's exact log-probabilities at T (no division at T = 1: one pass fewer)."""
    dtype = _compute_dtype(logp)
    logp = logp.to(dtype)
    return (logp if temperature == 1.0 else logp / temperature) - logz.to(dtype)


def pld_loss_from_ranking(
        student_logits: Tensor, labels: Tensor, targets: TeacherTargets, *, reduction: Reduction = "mean",
) -> Tensor:
    """Exact PLD head from a precomputed ranking: O(C + K), no sort.

    With ``k = C`` this equals :func:`pld_loss`; with ``k < C`` it equals the first K' terms of the full
    loss (the exact Plackett-Luce likelihood of the top-K' ordering, the rest unordered).
    """
    _check_student(student_logits, labels, targets.num_classes)
    labels, topk_idx, temp = labels.long(), targets.topk_idx.long(), targets.temperature
    if targets.k == targets.num_classes:  # a whole ranking: no head to build, no rest block
        loss = _PlackettLuceFull.apply(student_logits, topk_idx, labels, _label_position(topk_idx, labels),
                                       _log_weights(targets.topk_logp, targets.logz[:, None], temp).exp_(),
                                       _log_weights(targets.label_logp, targets.logz, temp).exp_())
        return _reduce(loss, reduction)
    # The head: slot 0 the label, slots 1..K the top-k in teacher order; a top-k slot holding the label takes no
    # step (the label went first), so no slot is moved and no sort is needed.
    head_idx = torch.cat([labels[:, None], topk_idx], dim=1)
    valid = head_idx != labels[:, None]
    valid[:, 0] = True
    logp = torch.cat([targets.label_logp[:, None], targets.topk_logp], dim=1)
    alpha = _log_weights(logp, targets.logz[:, None], temp).exp_() * valid
    return _reduce(_PlackettLuceHead.apply(student_logits, head_idx, valid, alpha), reduction)


def pld_loss(
        student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
        reduction: Reduction = "mean",
) -> Tensor:
    """Plackett-Luce distillation loss from full teacher logits (one sort per batch, vectorized)."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape.")
    _check_temperature(temperature)
    t = teacher_logits.detach().to(_compute_dtype(teacher_logits))
    # The teacher order (ties: lower index first), the order TeacherTargets stores; the kernel puts the label
    # first itself. NaN and +inf sort first, -inf last: two columns tell, not a pass over B x C.
    order = teacher_order(t)
    t_sorted = t.gather(1, order)
    _check_student(student_logits, labels, teacher=t_sorted[:, [0, -1]])
    labels = labels.long()
    pos = _label_position(order, labels)
    alpha = torch.softmax(t_sorted if temperature == 1.0 else t_sorted / temperature, dim=1)  # in teacher order
    loss = _PlackettLuceFull.apply(student_logits, order, labels, pos, alpha, alpha.gather(1, pos).squeeze(1))
    return _reduce(loss, reduction)


class PLDLoss(torch.nn.Module):
    """Drop-in for the paper's reference ``PLDLoss(temperature)``: ``forward(student, teacher, labels)``."""

    def __init__(self, temperature: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        return pld_loss(student_logits, teacher_logits, labels, self.temperature, self.reduction)


LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class LossEntry:
    """One registered loss, described once, by its definition: timm-style registry instead of lists of names,
    parameter sets and defaults repeated in the trainer and the CLI."""
    name: str
    fn: LossFn  # fn(student_logits, labels, targets, *, <params>, reduction)
    needs_teacher: bool  # False: trains from labels alone (no cache needed)
    temperature: float  # default teacher temperature
    params: dict[str, float]  # tunable keyword parameters -> defaults, read from fn's signature


#: name -> LossEntry, in registration order. The trainer picks a loss by name.
LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, needs_teacher: bool = True, temperature: float = 1.0) -> Callable[[LossFn], LossFn]:
    def register(fn: LossFn) -> LossFn:
        params = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name not in ("reduction", "mix")}
        if fn.__module__ == __name__:  # a built-in: the torch-free description (loss_names.py) must agree
            info = BUILTIN_LOSSES.get(name)
            if info is None or (info.needs_teacher, info.temperature, info.params) != (needs_teacher, temperature, params):
                raise RuntimeError(f"loss_names.BUILTIN_LOSSES[{name!r}] disagrees with its definition in losses.py")
        LOSSES[name] = LossEntry(name, fn, needs_teacher, temperature, params)
        return fn
    return register


def get_loss(name: str) -> LossEntry:
    if name not in LOSSES:
        raise ValueError(f"Unsupported loss '{name}'. Use one of: {', '.join(LOSSES)}.")
    return LOSSES[name]


@register_loss("ce", needs_teacher=False)
def ce_loss(student_logits: Tensor, labels: Tensor, targets: TeacherTargets | None = None, *,
            mix: MixedLabels | None = None, reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy on the true label (mixed views: on both labels, lambda-weighted; float32 accumulation);
    ignores the teacher."""
    _check_student(student_logits, labels)
    s = student_logits.to(_compute_dtype(student_logits))
    return _reduce(_label_ce(s, labels, mix), reduction)


def _masked_logsumexp(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """logsumexp over ``mask``; rows with an empty mask give 0 with a zero (not NaN) gradient."""
    has_any = mask.any(1)
    filled = torch.where(mask, x, torch.where(has_any[:, None], -math.inf, 0.0))
    return torch.logsumexp(filled, dim=1), has_any


@register_loss("kd", temperature=2.0)
def kd_loss(student_logits: Tensor, labels: Tensor, targets: TeacherTargets, *, alpha: float = 0.1,
            mix: MixedLabels | None = None, reduction: Reduction = "mean") -> Tensor:
    """Hinton KD: ``alpha * CE + (1 - alpha) * T^2 * KL(p_T || q_T)``.

    From a top-k target the KL runs over K+1 bins (the K classes and one "rest" bin holding the remaining
    mass on both sides), which is exact for those coarsened distributions; with k = C it is standard KD.
    A softmax over the top-k alone would be biased.
    """
    _check_student(student_logits, labels, targets.num_classes)
    temp = targets.temperature
    s = student_logits.to(_compute_dtype(student_logits))
    log_q = torch.log_softmax(s / temp, dim=1)
    idx = targets.topk_idx.long()
    log_p_top = targets.topk_log_probs().to(s.dtype)
    kl_top = (log_p_top.exp() * (log_p_top - log_q.gather(1, idx))).sum(1)
    rest = torch.ones_like(log_q, dtype=torch.bool).scatter(1, idx, False)
    log_q_rest, has_rest = _masked_logsumexp(log_q, rest)
    p_rest = torch.where(has_rest, (1.0 - log_p_top.exp().sum(1)).clamp_min(0.0), 0.0)
    kl_rest = torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    kd = (temp ** 2) * (kl_top + kl_rest)
    ce = _label_ce(s, labels, mix)
    return _reduce(alpha * ce + (1.0 - alpha) * kd, reduction)


def _pearson(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    return F.cosine_similarity(x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True), dim=1, eps=eps)


@register_loss("dist")
def dist_loss(student_logits: Tensor, labels: Tensor, targets: TeacherTargets, *, alpha: float = 0.1,
              beta: float = 0.45, gamma: float = 0.45, mix: MixedLabels | None = None,
              reduction: Reduction = "mean") -> Tensor:
    """DIST (Huang et al. 2022): ``alpha * CE + T^2 * (beta * inter + gamma * intra)``.

    inter = 1 - mean Pearson correlation of student/teacher probabilities per sample, intra = the same per
    class across the batch. Needs a dense teacher vector: exact for k = C; from a top-k cache the tail
    mass is spread evenly (:meth:`TeacherTargets.dense_probs`). The relation terms are batch-level, so
    ``reduction="none"`` adds them to every sample's CE.
    """
    _check_student(student_logits, labels, targets.num_classes)
    temp = targets.temperature
    s = student_logits.to(_compute_dtype(student_logits))
    y_s = torch.softmax(s / temp, dim=1)
    y_t = targets.dense_probs().to(s.dtype)
    inter = 1.0 - _pearson(y_s, y_t).mean()
    intra = 1.0 - _pearson(y_s.T, y_t.T).mean()
    relation = (temp ** 2) * (beta * inter + gamma * intra)
    ce = _label_ce(s, labels, mix)
    return _reduce(alpha * ce + relation, reduction)


#: How a mixed view enters PLD's ranking, which needs one class first: ``dominant``, the label weighing more
#: (what the cache's ``label_logp`` holds for mixed views), or ``teacher``, the teacher's own ranking with no label
#: forced first (its top-1 leads). Plain views always put their true label first. See docs/results.md.
MIXED_FIRST = ("dominant", "teacher")


@register_loss("pld")
def _pld_named(student_logits: Tensor, labels: Tensor, targets: TeacherTargets, *, mixed_first: str = "dominant",
               mix: MixedLabels | None = None, reduction: Reduction = "mean") -> Tensor:
    if mix is not None:
        if mixed_first not in MIXED_FIRST:
            raise ValueError(f"Unsupported --mixed-first '{mixed_first}'. Use one of: {', '.join(MIXED_FIRST)}.")
        if mixed_first == "dominant":
            labels = mix.dominant(labels)
        else:
            mixed = mix.lam < 1
            labels = torch.where(mixed, targets.topk_idx[:, 0].long(), labels.long())
            targets = replace(targets, label_logp=torch.where(mixed, targets.topk_logp[:, 0], targets.label_logp))
    return pld_loss_from_ranking(student_logits, labels, targets, reduction=reduction)


def create_loss(name: str, **params: float) -> Callable[[Tensor, Tensor, TeacherTargets | None], Tensor]:
    """``loss(student_logits, labels, targets)`` for a registered loss and its keyword parameters (see
    ``LOSSES[name].params``). Unknown names and parameters fail here, not mid-run."""
    entry = get_loss(name)
    unknown = set(params) - set(entry.params)
    if unknown:
        raise ValueError(f"Loss '{name}' takes no parameter(s) {sorted(unknown)}; allowed: "
                         f"{sorted(entry.params) or 'none'}.")

    def loss(student_logits: Tensor, labels: Tensor, targets: TeacherTargets | None = None,
             mix: MixedLabels | None = None) -> Tensor:
        if entry.needs_teacher and targets is None:
            raise ValueError(f"Loss '{name}' needs teacher targets (a cache); only 'ce' trains without one.")
        return entry.fn(student_logits, labels, targets, **params, **({} if mix is None else {"mix": mix}))

    return loss
