"""The plain student: cross-entropy with the labels, no teacher."""
from .base import BaselineConfig, Distiller, register_distiller


@register_distiller("baseline")
class BaselineDistiller(Distiller):
    """The plain student: cross-entropy only."""

    config_class = BaselineConfig
    needs_teacher = False

    def forward(self, images, targets, epoch=0):
        cls = self.cross_entropy(self.run_student(images)["logits"], targets)
        return {"cls": cls, "total": cls}
