"""Teacher logits -> what the cache stores per view (and back to loss targets)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..losses import TeacherTargets
from .format import MIN_LOGP


def encode_teacher_logits(logits: torch.Tensor, labels: torch.Tensor, *, k: int,
                          temperatures: Sequence[float]) -> dict[str, torch.Tensor]:
    """Top-k ranking (stable: ties by lower class index), log-probs at T=1, the label's log-prob and
    ``logz[T] = logsumexp(log_softmax(t) / T)`` for each T in the grid: enough for exact PLD-head and
    K+1-bin KD weights at any cached temperature. Computed in float32 whatever the teacher's dtype."""
    if not torch.isfinite(logits).all():
        raise ValueError("teacher produced NaN/Inf logits")
    targets = TeacherTargets.from_logits(logits.float(), labels, k=k)
    logp = torch.log_softmax(logits.float(), dim=1)
    logz = torch.stack([torch.logsumexp(logp / t, dim=1) for t in temperatures], dim=1)
    return {
        "topk_idx": targets.topk_idx,
        "topk_logp": targets.topk_logp.clamp_min(MIN_LOGP),
        "label_logp": targets.label_logp.clamp_min(MIN_LOGP),
        "logz": logz,
        "correct": targets.topk_idx[:, 0] == labels,
    }


def targets_from_arrays(topk_idx: np.ndarray | torch.Tensor, topk_logp, label_logp, logz, *,
                        temperature: float, num_classes: int) -> TeacherTargets:
    """Cached arrays (one row per sample, the chosen view and temperature) -> loss targets."""
    as_t = lambda x: torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)  # noqa: E731
    return TeacherTargets(
        topk_idx=as_t(topk_idx).long(), topk_logp=as_t(topk_logp).float(), label_logp=as_t(label_logp).float(),
        logz=as_t(logz).float(), temperature=temperature, num_classes=num_classes)
