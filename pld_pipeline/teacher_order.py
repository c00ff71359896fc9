"""The teacher's ranking: each row's classes by descending logit, ties by lower class index.

That is ``torch.sort(t, dim=1, descending=True, stable=True).indices``, the order the cache stores and PLD ranks
by. On CPU torch's sort is the bulk of ``pld_loss`` (about 17 ms for 256 x 1000 floats on one thread, 5x plain KD's
whole step); numpy's vectorised sort of one int64 key per entry (the float's bits mapped to an order-preserving
integer, the class index below them, so every key is distinct and any sort is the stable order) takes a quarter
of that. Float32 rows on CPU take that path, everything else torch's sort. A custom op, so ``torch.compile``
keeps it inside the graph as one opaque call instead of breaking the graph at the numpy call.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["teacher_order"]


def _keyed_order(t: np.ndarray) -> np.ndarray:
    """Stable descending argsort of a float32 [B, C] array, through one int64 key per entry (in-place numpy steps:
    temporaries would cost more than the sort)."""
    bits = (t + np.float32(0.0)).view(np.int32)  # + 0.0 folds -0.0 into +0.0: equal values, equal keys
    key = bits >> 31
    key &= np.int32(0x7FFFFFFF)
    key ^= bits  # negative floats' magnitude bits flipped: ascending int32 order = ascending float order
    np.invert(key, out=key)  # ~ reverses the order without overflow: descending
    keys = key.astype(np.int64)
    keys <<= 32
    keys |= np.arange(t.shape[1], dtype=np.int64)  # ties: lower class index first
    keys.sort(axis=1)
    keys &= np.int64(0xFFFFFFFF)
    return keys


@torch.library.custom_op("pld_pipeline::teacher_order", mutates_args=())
def teacher_order(t: Tensor) -> Tensor:
    """[B, C] int64: each row's class indices by descending value, ties by lower index (torch's stable sort).

    A NaN sorts above +inf (below -inf when its sign bit is set): either way a row's first or last entry tells
    whether it holds a non-finite value, which is all a caller may rely on; such rows are refused."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.ndim == 2 and t.shape[1] < 2 ** 31:
        return torch.from_numpy(_keyed_order(t.detach().contiguous().numpy()))
    return torch.sort(t, dim=-1, descending=True, stable=True).indices


@teacher_order.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t, dtype=torch.long)
