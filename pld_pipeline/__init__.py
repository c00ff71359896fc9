"""pld-pipeline: cache teacher logits once (Zarr v3), train many students with Plackett-Luce distillation."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Exported lazily (PEP 562): `import pld_pipeline.cache` and the light commands (pld --help, inspect, verify,
# report) must not pay for torch, which losses and student_data import.
_EXPORTS = {
    **dict.fromkeys(["LOSSES", "PLDLoss", "TeacherTargets", "ce_loss", "create_loss", "dist_loss", "kd_loss",
                     "pld_loss", "pld_loss_from_ranking"], "losses"),
    **dict.fromkeys(["Batch", "StudentData"], "student_data"),
}

__all__ = [
    "Batch", "LOSSES", "PLDLoss", "StudentData", "TeacherTargets", "ce_loss", "create_loss", "dist_loss", "kd_loss", "pld_loss",
    "pld_loss_from_ranking", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
