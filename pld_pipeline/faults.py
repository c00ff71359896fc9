"""Named kill points for the fault-injection tests: a real SIGKILL at a chosen point of a real run.

``PLD_KILL_AT=name`` (or ``name:n``, the n-th time it is reached, 1-based) kills this process there with
SIGKILL, so tests can prove that a crash at exactly that point resumes correctly. Unset (always, outside the
tests), a kill point costs one environment lookup.
"""
from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get("PLD_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
