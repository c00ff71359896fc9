"""pld-pipeline: cache teacher logits once (Zarr v3), train many students with Plackett-Luce distillation."""
from .losses import (
    LOSSES, PLDLoss, TeacherTargets, ce_loss, create_loss, dist_loss, kd_loss, pld_loss, pld_loss_from_ranking,
)
from .student_data import Batch, StudentData

__version__ = "0.1.0"

__all__ = [
    "Batch", "LOSSES", "PLDLoss", "StudentData", "TeacherTargets", "ce_loss", "create_loss", "dist_loss", "kd_loss", "pld_loss",
    "pld_loss_from_ranking", "__version__",
]
