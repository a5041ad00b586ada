"""Convolutional teachers: the paper's ResNet152x2 (Table 4's first Logits column), for the
recipes that read a teacher's logits (``logits``, ``kd``) or its pooled feature (``rkd``).

A CNN has no attention: its taps refuse, in words, a recipe that asks for attention maps or
q, k, v (``cakd``). Its token grid is its last feature map (1/32 of the input), whose positions
are its ``patch_tokens``; its ``cls_token`` is the pooled feature its classifier reads.
ResNet152x2 is ResNet-152 with every width doubled, built as ``resnet50x2`` is
(:func:`cakd.students.resnet_x2`). Torchvision has no weights for it: they are a file of the
user's (``--teacher-weights``), e.g. a run of ours trained with ``--model resnet152x2``.
"""
import math

from torchvision.models.resnet import ResNet

from ..students import resnet_x2
from ..taps import FeatureTaps
from .base import TeacherFamily, TeacherTaps
from .registry import register_teacher_family


class WideResNetTeacher(ResNet):
    """A ResNet teacher with every width doubled: a class of its own, so the registry tells
    it from a ResNet student (``family_of``)."""


def resnet152x2(num_classes: int = 1000) -> WideResNetTeacher:
    """ResNet-152 ([3, 8, 36, 3] bottlenecks) with every width doubled."""
    return resnet_x2([3, 8, 36, 3], num_classes, cls=WideResNetTeacher)


@register_teacher_family
class WideResNetFamily(TeacherFamily):
    model_class = WideResNetTeacher
    names = ("resnet152x2",)
    builders = {"resnet152x2": resnet152x2}

    def build(self, name, num_classes=1000, image_size=224):
        """Any input size from 32 up: a ResNet pools whatever its last map is."""
        return self.builders[name](num_classes=num_classes)

    def token_grid(self, model, image_size, name=None):
        """The side of the last feature map: five stride-2 stages, each rounding up."""
        if image_size < 32:
            raise ValueError(f"{name or 'a ResNet teacher'} needs images of 32 pixels or more, not {image_size}")
        return math.ceil(image_size / 32)

    def taps(self, teacher, image_size, attention=True, tokens=True, qkv=False, fold="auto"):
        if attention or qkv:
            raise ValueError(
                f"a CNN teacher ({type(teacher).__name__}) has no attention maps or q, k, v for this recipe: use it with "
                "the logits, kd or rkd recipe, or distil from a transformer teacher"
            )
        return WideResNetTaps(teacher, image_size, tokens)


class WideResNetTaps(TeacherTaps):
    """Taps on a :class:`WideResNetTeacher`: ``logits``, and with ``tokens=True`` the pooled
    feature the classifier reads (``cls_token``, (B, C)) and the last feature map's positions
    (``patch_tokens``, (B, N, C), row-major)."""

    def __init__(self, teacher, image_size, tokens=True):
        self.teacher = self.runner = teacher
        self.image_size, self.attention, self.qkv, self.tokens = image_size, False, False, tokens
        self.grid = math.ceil(image_size / 32)
        self.width, self.num_heads = teacher.fc.in_features, 0
        self.taps = FeatureTaps(teacher, outputs=["layer4"] if tokens else [], inputs=["fc"] if tokens else [])

    def __call__(self, images):
        out = {"logits": self.runner(images)}
        if self.tokens:
            out["cls_token"] = self.taps.pop("fc")
            out["patch_tokens"] = self.taps.pop("layer4").flatten(2).transpose(1, 2)
        return out
