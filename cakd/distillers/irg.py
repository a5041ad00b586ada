"""IRG: Liu et al.'s instance relationship graph (CVPR 2019), the paper's "IRG" column:
``CE + irg_loss`` over the logits (vertices), two layers and the embedding of each network
(edges) and one move between two layers of one width in each (transformation). Which layers of a
CNN student and a ViT or Swin teacher play them is ours (docs/FIDELITY.md, "The comparison columns")."""
from dataclasses import dataclass

import torch
from torchvision.models import Inception3, SwinTransformer, VisionTransformer

from ..losses import irg_loss
from ..students import student_layout
from ..taps import FeatureTaps
from ..teachers.registry import teacher_taps
from .base import BaselineConfig, Distiller, check_classes, register_distiller
from .rkd import StudentFeatures


@dataclass
class IRGConfig(BaselineConfig):
    """The IRG terms' weights (the authors' released code) and the layers they read (ours)."""

    irg_vertex_weight: float = 0.002  # the logits term, ours (the authors' prototxts carry none): 2 / classes, the released logit MSE's scale; 1 diverges at lr 0.1 with 1000 classes
    irg_edge_weight: float = 0.005  # each edge term: the authors' IRG prototxt
    irg_transform_weight: float = 0.005  # the transformation term: the authors' IRG-transformation prototxt
    irg_student_layers: str = "auto"  # edges besides the embedding: "auto" (the last stages at 4x and 2x the final grid) or module names, comma-separated
    irg_teacher_layers: str = "auto"  # paired by position: "auto" (ViT blocks at 1/2 and 3/4 of the depth; Swin stages 2 and 3) or module names
    irg_student_transform: str = "auto"  # two layers of one width, "from,to": "auto" (ResNet layer4.0,layer4) or "none"
    irg_teacher_transform: str = "auto"  # "auto" (ViT: block at 3/4 of the depth to the last; Swin: last stage's first block to its output) or "none"


def names(value):
    return [name.strip() for name in value.split(",") if name.strip()]


def auto_student_layers(student, image_size):
    layout = student_layout(student, image_size)
    final = [height for _, _, height, _ in layout.stages if height > 1][-1]  # the last grid (a pool gives 1x1)
    return [layout.stage_for(4 * final)[0], layout.stage_for(2 * final)[0]]


def layout_of(teacher):
    """``"swin"`` or ``"vit"``: the torchvision layouts whose layers ``auto`` knows; None for
    another teacher family (which names its layers)."""
    return "swin" if isinstance(teacher, SwinTransformer) else "vit" if isinstance(teacher, VisionTransformer) else None


def check_layout(teacher, key):
    if layout_of(teacher) is None:
        raise ValueError(f"{key} auto knows torchvision's ViT and Swin teachers; for {type(teacher).__name__} name its layers")


def auto_teacher_layers(teacher):
    check_layout(teacher, "irg_teacher_layers")
    if layout_of(teacher) == "swin":
        return ["features.3", "features.5"]
    depth = len(teacher.encoder.layers)
    return [f"encoder.layers.encoder_layer_{depth // 2 - 1}", f"encoder.layers.encoder_layer_{3 * depth // 4 - 1}"]


def auto_student_transform(student):
    if isinstance(student, Inception3):  # its last two blocks, both 2048 wide
        return ["Mixed_7b", "Mixed_7c"]
    if not hasattr(student, "layer4"):
        raise ValueError(
            f"irg_student_transform auto knows ResNet (layer4.0,layer4) and Inception-v3 (Mixed_7b,Mixed_7c) students; for {type(student).__name__} "
            "name two layers of one width, FROM,TO, or give none"
        )
    return ["layer4.0", "layer4"]


def auto_teacher_transform(teacher):
    check_layout(teacher, "irg_teacher_transform")
    if layout_of(teacher) == "swin":
        last = len(teacher.features) - 1
        return [f"features.{last}.0", f"features.{last}"]
    depth = len(teacher.encoder.layers)
    return [f"encoder.layers.encoder_layer_{3 * depth // 4 - 1}", f"encoder.layers.encoder_layer_{depth - 1}"]


def none_or_two(value, auto, what):
    """The two layers of a transformation key: [] for none."""
    if value == "none":
        return []
    layers = auto() if value == "auto" else names(value)
    if len(layers) != 2:
        raise ValueError(f"{what}={value!r}: give two layers of one width, FROM,TO (or auto, or none)")
    return layers


def teacher_vector(x: torch.Tensor, layout) -> torch.Tensor:
    """One vector per instance from a teacher layer: a Swin stage's (B, H, W, C) averaged over
    its grid, a ViT block's (B, 1 + N, D) over its patch tokens, another family's output over
    every dimension but the first and the last."""
    if layout == "vit":
        return x[:, 1:].mean(dim=1)
    return x.flatten(1, -2).mean(dim=1)


@register_distiller("irg")
class IRGDistiller(Distiller):
    """``CE + irg_loss``: vertices (logits), edges at ``irg_student_layers`` /
    ``irg_teacher_layers`` and at the embedding (the student's classifier head's input, the
    teacher's class or pooled token), the transformation between the two layers of
    ``irg_student_transform`` / ``irg_teacher_transform``. Under DDP the batch is each
    process's own, as in the original."""

    config_class = IRGConfig
    teacher_tokens = True

    @classmethod
    def build(cls, student, teacher, image_size, config):
        check_classes(cls.name, student, teacher)
        student_layers = (auto_student_layers(student, image_size) if config.irg_student_layers == "auto"
                          else names(config.irg_student_layers))
        teacher_layers = auto_teacher_layers(teacher) if config.irg_teacher_layers == "auto" else names(config.irg_teacher_layers)
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"irg_student_layers {','.join(student_layers)} and irg_teacher_layers {','.join(teacher_layers)} "
                             "pair by position: give as many of each")
        student_move = none_or_two(config.irg_student_transform, lambda: auto_student_transform(student), "irg_student_transform")
        teacher_move = none_or_two(config.irg_teacher_transform, lambda: auto_teacher_transform(teacher), "irg_teacher_transform")
        if bool(student_move) != bool(teacher_move):
            raise ValueError("irg_student_transform and irg_teacher_transform: give both, or none for both")
        taps = teacher_taps(teacher, image_size, attention=False, tokens=True)
        distiller = cls(StudentFeatures(student, student_layers + student_move), teacher, teacher_taps=taps, config=config)
        distiller.edges = len(student_layers)
        distiller.teacher_layers, distiller.teacher_move = teacher_layers, teacher_move
        distiller.teacher_layer_taps = FeatureTaps(teacher, outputs=sorted(set(teacher_layers + teacher_move)))
        distiller.layout = layout_of(teacher)
        return distiller

    def forward(self, images, targets, epoch=0):
        teacher = self.run_teacher(images)
        layers = {name: teacher_vector(self.teacher_layer_taps.pop(name), self.layout)
                  for name in set(self.teacher_layers + self.teacher_move)}
        student = self.run_student(images)
        cls = self.cross_entropy(student["logits"], targets)
        s_edges, s_move = student["layers"][: self.edges], student["layers"][self.edges :]
        c = self.config
        irg = irg_loss(
            student["logits"], teacher["logits"],
            [*s_edges, student["pooled"]], [*(layers[n] for n in self.teacher_layers), teacher["cls_token"]],
            [tuple(s_move)] if s_move else (), [tuple(layers[n] for n in self.teacher_move)] if s_move else (),
            c.irg_vertex_weight, c.irg_edge_weight, c.irg_transform_weight,
        )
        return {"cls": cls, "irg": irg, "total": cls + irg}

    def close(self):
        super().close()
        self.teacher_layer_taps.remove()
