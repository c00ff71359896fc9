"""The built-in losses' names, defaults and parameters, without torch: what the command line's help text and the
light commands need. losses.py registers the functions themselves; it checks at import that every built-in it
registers matches its entry here (so the two cannot drift), and tests/test_losses.py checks none is missing."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossInfo:
    name: str
    needs_teacher: bool  # False: trains from labels alone (no cache needed)
    temperature: float  # default teacher temperature
    params: dict[str, float | str]  # tunable keyword parameters -> defaults


#: name -> LossInfo of the built-in losses, in registration order.
BUILTIN_LOSSES: dict[str, LossInfo] = {e.name: e for e in (
    LossInfo("ce", False, 1.0, {}),
    LossInfo("kd", True, 2.0, {"alpha": 0.1}),
    LossInfo("dist", True, 1.0, {"alpha": 0.1, "beta": 0.45, "gamma": 0.45}),
    LossInfo("pld", True, 1.0, {"mixed_first": "dominant"}),
)}
