"""Logit distillation: the released logit MSE (``logits``) and Hinton et al.'s knowledge
distillation (``kd``, the paper's "Logits" column)."""
from dataclasses import dataclass
from typing import ClassVar

from ..losses import kd_loss
from .base import BaselineConfig, Distiller, mse, register_distiller


@dataclass
class LogitsConfig(BaselineConfig):
    """The logits term: the released MSE, or Hinton et al.'s knowledge distillation (``kd``):
    ``(1 - kd_alpha) * CE + kd_alpha * kd_loss(z_S, z_T, kd_temperature)``."""

    CHOICES: ClassVar[dict] = {"logits_form": ("mse", "kd")}  # the first is the released form

    logits_form: str = "mse"  # "mse": logits_weight * MSE(z_S, z_T) (released); "kd": Hinton KD (the paper's "Logits")
    logits_weight: float = 1.0  # weight of MSE(z_S, z_T) (logits_form mse)
    kd_temperature: float = 1.0  # T of the kd form (paper silent; torchdistill's and mdistiller's ImageNet KD: 1)
    kd_alpha: float = 0.5  # kd form: weight of the soft-target term, the label term gets 1 - kd_alpha

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha={self.kd_alpha!r} must be in [0, 1] (the soft-target term's share)")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature={self.kd_temperature!r} must be above 0")

    def logits_term(self, student_logits, teacher_logits):
        """The weighted logits term: ``logits_weight * MSE`` or ``kd_alpha * kd_loss``."""
        if self.logits_form == "kd":
            return self.kd_alpha * kd_loss(student_logits, teacher_logits, self.kd_temperature)
        return self.logits_weight * mse(student_logits, teacher_logits)

    def label_weight(self, with_logits_term: bool = True) -> float:
        """The cross-entropy's weight: ``1 - kd_alpha`` beside a kd term, else 1."""
        return 1.0 - self.kd_alpha if with_logits_term and self.logits_form == "kd" else 1.0


@dataclass
class KDConfig(LogitsConfig):
    """Hinton et al.'s knowledge distillation (the paper's "Logits" column)."""

    logits_form: str = "kd"


@register_distiller("logits")
class LogitsDistiller(Distiller):
    """Logit matching: ``L_cls + w * MSE(z_S, z_T)`` (released), or Hinton KD
    ``(1 - alpha) * L_cls + alpha * kd_loss(z_S, z_T, T)`` (``logits_form="kd"``)."""

    config_class = LogitsConfig

    def forward(self, images, targets, epoch=0):
        teacher = self.run_teacher(images)
        logits = self.run_student(images)["logits"]
        cls = self.cross_entropy(logits, targets)
        match = self.config.logits_term(logits, teacher["logits"])
        name = "kd" if self.config.logits_form == "kd" else "logits"
        return {"cls": cls, name: match, "total": self.config.label_weight() * cls + match}


@register_distiller("kd")
class KDDistiller(LogitsDistiller):
    """Hinton et al.'s knowledge distillation, the paper's "Logits" column: the logits recipe
    with ``logits_form="kd"`` (``T = 1``, ``alpha = 0.5`` unless set)."""

    config_class = KDConfig
