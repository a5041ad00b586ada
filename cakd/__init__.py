"""Cross-Architecture Knowledge Distillation (Liu et al., ACCV 2022) on stock torch and torchvision."""
from .weights import export_student
from .distillers import BaselineConfig, CAKDConfig, IRGConfig, KDConfig, LogitsConfig, RKDConfig, build_distiller
from .losses import irg_loss, kd_loss, rkd_loss
from .zoo import build_student, build_teacher

__all__ = [
    "BaselineConfig",
    "CAKDConfig",
    "IRGConfig",
    "KDConfig",
    "LogitsConfig",
    "RKDConfig",
    "build_distiller",
    "build_student",
    "build_teacher",
    "export_student",
    "irg_loss",
    "kd_loss",
    "rkd_loss",
]
__version__ = "0.1.0"
