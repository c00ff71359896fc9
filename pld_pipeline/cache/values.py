"""Stored values checked where they are used: every block a reader takes, and `pld verify`, run the same checks.

Checksums and bindings say the bytes are the ones written, not that the writer was honest: a re-signed cache
can hold NaN log-normalisers (a student trained to NaN weights with exit 0), class indices past the classifier,
a class twice in one ranking, or rows marked as padding that silently leave training. :func:`teacher_problems`
and :func:`sample_problems` find what no honest writer stores; readers refuse the unit at the first problem,
`verify` lists them all. Skipped samples (their rows hold the fill values -1 / NaN) are not checked; they are
never trained on.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .format import SampleStatus

#: Slack for float16 deltas and float32 sums in log space: an honest cache is orders of magnitude inside it.
LOG_TOL = 1e-2


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    return np.log(np.exp(x - top).sum(-1)) + top[..., 0]


def teacher_problems(topk_idx: np.ndarray, topk_logp: np.ndarray, label_logp: np.ndarray, logz: np.ndarray,
                     ok: np.ndarray, num_classes: int, temperatures: Sequence[float],
                     labels: np.ndarray | None = None, first: bool = False) -> list[tuple[str, int]]:
    """What is wrong with a teacher block's usable rows (``ok``: [n] bool), each with the first view it is in
    (``first``: stop at the first). Shapes: ``topk_idx``/``topk_logp`` [n, V, k], ``label_logp`` [n, V], ``logz``
    [n, V, T] (or [n, V]: one temperature), ``labels`` [n] or [n, V] (the label each view ranks first) or None.

    An honest writer stores, for each view, the teacher's k largest log-probabilities over C classes, once each
    and descending (so the first is at least -log C), a log-normaliser per temperature under which the stored
    probabilities are a sub-distribution (a whole one when k = C), and the label's log-prob (its own top-k entry
    where it has one)."""
    logz = logz if logz.ndim == 3 else logz[..., None]
    idx, logp, lab, lz = (a[ok] for a in (topk_idx, topk_logp, label_logp, logz))
    k = idx.shape[-1]
    taus = np.asarray(temperatures, np.float64)[: lz.shape[-1]]
    finite = np.isfinite(logp).all(-1) & np.isfinite(lab) & np.isfinite(lz).all(-1)  # [rows, V]
    safe = lambda bad: bad & finite  # noqa: E731  (value checks only where every value is finite)

    def sums_at_each_temperature() -> np.ndarray:
        per_tau = _logsumexp(logp[..., None, :] / taus[:, None] - lz[..., :, None])  # [rows, V, T]
        bad = (per_tau > LOG_TOL).any(-1)
        return bad | (per_tau < -LOG_TOL).any(-1) if k == num_classes else bad

    def label_entry() -> np.ndarray:
        want = labels[ok] if labels.ndim == 2 else np.broadcast_to(labels[ok][:, None], lab.shape)
        is_label = idx == want[..., None]
        # the entry is a float16 delta from the top-1: it may differ by its rounding, |delta| * 2^-11
        gap = np.abs(lab[..., None] - logp)
        return (is_label & (gap > np.abs(logp - logp[..., :1]) * 2.0 ** -10 + 1e-5)).any(-1)

    checks: list[tuple[Callable[[], np.ndarray], str]] = [
        (lambda: ((idx < 0) | (idx >= num_classes)).any(-1), f"class indices outside [0, {num_classes})"),
        (lambda: (np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any(-1), "a repeated class index within a top-k row"),
        (lambda: ~np.isfinite(logp).all(-1), "non-finite top-k log-probs"),
        (lambda: ~np.isfinite(lab), "a non-finite label log-prob"),
        (lambda: ~np.isfinite(lz).all(-1), "non-finite logz"),
        (lambda: safe((np.diff(logp, axis=-1) > 1e-3).any(-1)), "top-k log-probs not in descending order"),
        (lambda: safe(lab > 0), "a label log-prob above 0"),
        (lambda: safe(logp[..., 0] < -math.log(num_classes) - LOG_TOL),
         f"a top-1 log-prob below -log {num_classes}"),  # the largest of C probabilities is at least 1/C
        (lambda: safe(_logsumexp(logp) > LOG_TOL), "top-k probabilities that sum above 1"),
        (lambda: safe(sums_at_each_temperature()), "a logz under which the stored probabilities do not sum to "
                                                    + ("1" if k == num_classes else "at most 1")),
        (lambda: safe(((lab[..., None] / taus - lz) > LOG_TOL).any(-1)), "a label probability above 1 under logz"),
    ]
    if labels is not None:
        checks.append((lambda: safe(label_entry()), "a label log-prob unequal to its top-k entry"))
    found = []
    for bad_of, what in checks:
        bad = bad_of() if idx.size else np.zeros(lab.shape, bool)
        if bad.any():
            found.append((what, int(np.argwhere(bad)[0][1])))
            if first:
                break
    return found


def first_problem(topk_idx: np.ndarray, topk_logp: np.ndarray, label_logp: np.ndarray, logz: np.ndarray,
                  ok: np.ndarray, num_classes: int, temperatures: Sequence[float] = (1.0,),
                  labels: np.ndarray | None = None) -> tuple[str, int] | None:
    """The first of :func:`teacher_problems` and its view, None when the block is clean."""
    found = teacher_problems(topk_idx, topk_logp, label_logp, logz, ok, num_classes, temperatures, labels, first=True)
    return found[0] if found else None


def sample_problems(status: np.ndarray, labels: np.ndarray, keys: np.ndarray, n: int, num_classes: int) -> list[str]:
    """What is wrong with a samples unit (whole region, padding rows included; ``n`` samples): a status other
    than OK/SKIPPED for a sample or EMPTY for padding (a sample marked as padding would silently leave
    training), labels outside [0, C) or keys empty or not UTF-8 for usable samples."""
    problems = []
    if not np.isin(status[:n], (SampleStatus.OK, SampleStatus.SKIPPED)).all() or (status[n:] != SampleStatus.EMPTY).any():
        problems.append("sample status values outside the spec (OK/SKIPPED for samples, EMPTY for padding)")
    ok = status[:n] == SampleStatus.OK
    if ((labels[:n][ok] < 0) | (labels[:n][ok] >= num_classes)).any():
        problems.append(f"labels outside [0, {num_classes})")
    if (keys[:n, 0] == 0).any():
        problems.append("empty sample keys")
    try:
        [bytes(row).rstrip(b"\0").decode("utf-8") for row in keys[:n]]
    except UnicodeDecodeError:
        problems.append("sample keys that are not UTF-8")
    return problems
