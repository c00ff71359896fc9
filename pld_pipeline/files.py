"""Small files in run and sweep directories, written so that a crash leaves the old version or the new one.

A run killed mid-write must never leave a truncated summary.json, tracking.json or halving.json behind: the
next reader would fail on it (or, worse, a rerun would treat the run as something it is not).
"""
from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, doc: Any) -> None:
    """``doc`` as indented JSON at ``path``: written to ``path.tmp``, then renamed over it (atomic on POSIX)."""
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
