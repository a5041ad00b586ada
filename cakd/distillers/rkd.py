"""RKD: Park et al.'s relational knowledge distillation (CVPR 2019), the paper's "RKD" column:
``CE + rkd_loss(student's pooled feature, teacher's final embedding)``."""
from dataclasses import dataclass

from ..losses import rkd_loss
from ..students import head_name
from ..taps import FeatureTaps
from ..teachers.registry import teacher_taps
from .base import BaselineConfig, Distiller, StudentWithProjectors, register_distiller


@dataclass
class RKDConfig(BaselineConfig):
    """The distance- and angle-wise weights of Park et al. (the CAKD paper gives none)."""

    rkd_distance_weight: float = 25.0  # Park et al.'s weight of the distance-wise loss
    rkd_angle_weight: float = 50.0  # Park et al.'s weight of the angle-wise loss


class StudentFeatures(StudentWithProjectors):
    """The student, no projector, with taps on its classifier head's input (``pooled``, the
    embedding) and on the outputs of the submodules ``layers``, each averaged over its grid
    (``layers``: a list in the order given). Keyed as :class:`StudentWithProjectors`."""

    def __init__(self, student, layers=()):
        super().__init__(student)
        self.layers, self.head = list(layers), head_name(student)
        self.taps = FeatureTaps(student, outputs=sorted(set(self.layers)), inputs=[self.head])

    def forward(self, images, teacher=None, projector_grad=True):
        logits = self.student(images)
        outputs = {name: self.taps.pop(name) for name in set(self.layers)}
        return {"logits": logits, "pooled": self.taps.pop(self.head).flatten(1),
                "layers": [outputs[name].mean(dim=(2, 3)) for name in self.layers]}


@register_distiller("rkd")
class RKDDistiller(Distiller):
    """``CE + rkd_distance_weight * L_D + rkd_angle_weight * L_A`` between the relations of the
    batch's student embeddings (the classifier head's input) and the teacher's (ViT: the class
    token after the final LayerNorm; Swin: the pooled token). Under DDP the batch is each
    process's own, as in the original."""

    config_class = RKDConfig
    teacher_tokens = True

    @classmethod
    def build(cls, student, teacher, image_size, config):
        taps = teacher_taps(teacher, image_size, attention=False, tokens=True)
        return cls(StudentFeatures(student), teacher, teacher_taps=taps, config=config)

    def batch_line(self, batch_size):
        """RKD compares the relations within each process's batch (:func:`rkd_loss`): under 3 images
        there is no triplet for the angle term and at most one distance, normalised to 1 on both sides."""
        if batch_size >= 3:
            return None
        return (f"note: {batch_size} image(s) per process: RKD's angle term has no triplet and its distance term no two "
                "distances to compare, so loss_rkd is 0 at every step; use --batch-size 3 or more")

    def forward(self, images, targets, epoch=0):
        teacher = self.run_teacher(images)
        student = self.run_student(images)
        cls = self.cross_entropy(student["logits"], targets)
        rkd = rkd_loss(student["pooled"], teacher["cls_token"], self.config.rkd_distance_weight, self.config.rkd_angle_weight)
        return {"cls": cls, "rkd": rkd, "total": cls + rkd}
