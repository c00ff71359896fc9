"""Live progress of a sweep's runs, the same on every launcher: each run writes ``metrics.jsonl`` (one line per
finished epoch) into its folder, which the sweep folder holds and every launcher's nodes share; a thread in the
sweep's process reads them and reports each new epoch. No channel from the workers (process pools, Ray tasks,
SLURM jobs) is needed, and a run's folder says the same thing after the sweep is gone.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Callable

from .errors import PldError
from .files import read_bytes

ProgressFn = Callable[[dict[str, Any]], None]
MAX_METRICS_BYTES = 16 << 20  # a run's metrics.jsonl is ~200 bytes an epoch


def _epochs(run_dir: str) -> list[dict[str, Any]]:
    """The finished epochs' records a run folder holds (an unreadable or half-written file: none yet)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        lines = read_bytes(path, MAX_METRICS_BYTES).splitlines() if os.path.isfile(path) else []
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError, PldError):
        return []
    return [r for r in rows if isinstance(r, dict)]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


class SweepWatch:
    """Emits ``{"event": "run_epoch", "name", "epoch" (1-based), "epochs", "train_loss", "val_top1", "eta_s"}``
    for every epoch a run of ``runs`` (name -> settings) finishes, polling every ``interval`` seconds in a thread;
    ``stop()`` polls once more, so every finished epoch is reported exactly once."""

    def __init__(self, out: str, runs: dict[str, dict[str, Any]], emit: ProgressFn, interval: float = 2.0) -> None:
        self.out, self.runs, self.emit, self.interval = out, runs, emit, interval
        # a resumed run reports the epochs it adds
        self.seen = {name: len(_epochs(s.get("out") or os.path.join(out, name))) for name, s in runs.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pld-sweep-watch", daemon=True)

    def __enter__(self) -> "SweepWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for name, settings in self.runs.items():
            rows = _epochs(settings.get("out") or os.path.join(self.out, name))
            total = settings.get("epochs")
            for i in range(self.seen[name], len(rows)):
                row = rows[i]
                seconds = [_number(r.get("epoch_seconds")) for r in rows[: i + 1]]
                seconds = [s for s in seconds if s == s]
                left = max(0, total - (i + 1)) if isinstance(total, int) else math.nan
                self.emit({"event": "run_epoch", "name": name, "epoch": i + 1, "epochs": total,
                           "train_loss": _number(row.get("train_loss")), "val_top1": _number(row.get("val_top1")),
                           "eta_s": sum(seconds) / len(seconds) * left if seconds else math.nan})
            self.seen[name] = max(self.seen[name], len(rows))
