"""Cross-Architecture Knowledge Distillation (Liu et al., ACCV 2022) on stock torch and torchvision."""
from .checkpoint import export_student
from .distillers import CAKDConfig, LogitsConfig, BaselineConfig, build_distiller
from .models import build_student, build_teacher

__all__ = [
    "BaselineConfig",
    "CAKDConfig",
    "LogitsConfig",
    "build_distiller",
    "build_student",
    "build_teacher",
    "export_student",
]
__version__ = "0.1.0"
