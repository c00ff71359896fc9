"""Teacher values checked where they are used: every block a student reads, before it reaches a loss.

Checksums and bindings say the bytes are the ones written, not that the writer was honest: a re-signed cache
can hold NaN log-normalisers (a student trained to NaN weights with exit 0) or class indices past the
classifier. :func:`first_problem` finds, naming the unit, what no honest writer stores: non-finite log-probs or
logz, class indices outside [0, C), top-k log-probs not descending, a label log-prob above 0. Skipped samples
(their rows hold the fill values -1 / NaN) are not checked; they are never trained on.
"""
from __future__ import annotations

import numpy as np


def first_problem(topk_idx: np.ndarray, topk_logp: np.ndarray, label_logp: np.ndarray, logz: np.ndarray,
                  ok: np.ndarray, num_classes: int) -> tuple[str, int] | None:
    """The first problem in a block's usable rows (``ok``: [n] bool) and the view it is in, None when clean.
    Shapes: ``topk_idx``/``topk_logp`` [n, V, k], ``label_logp`` [n, V], ``logz`` [n, V] or [n, V, T]."""
    logz = logz if logz.ndim == 3 else logz[..., None]
    checks = (
        (lambda: ((topk_idx < 0) | (topk_idx >= num_classes)).any(-1), f"class indices outside [0, {num_classes})"),
        (lambda: ~np.isfinite(topk_logp).all(-1), "non-finite top-k log-probs"),
        (lambda: (np.diff(topk_logp, axis=-1) > 0).any(-1), "top-k log-probs not in descending order"),
        (lambda: ~np.isfinite(label_logp), "a non-finite label log-prob"),
        (lambda: label_logp > 0, "a label log-prob above 0"),
        (lambda: ~np.isfinite(logz).all(-1), "non-finite logz"),
    )
    for bad_of, what in checks:
        bad = bad_of()[ok]  # [usable rows, V]
        if bad.any():
            return what, int(np.argwhere(bad)[0][1])
    return None
