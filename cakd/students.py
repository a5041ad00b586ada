"""What is the student's alone: the CNN names, the builders torchvision lacks, and the choice
of the student stage whose grid equals the teacher's token grid.

Students are torchvision CNNs (ResNet, Wide-ResNet, ResNeXt, MobileNet, EfficientNet); a
registered teacher may also be trained as a plain student (to fine-tune it), built by its
family through :mod:`cakd.zoo`, which builds and loads any model by name. The stage is found
by one rule, with no table per model: a forward pass on the meta device (no memory, no
arithmetic) records each stage's output shape, and the last stage whose grid is the teacher's wins.
"""
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torchvision.models.resnet import Bottleneck, ResNet

# the normalization of torchvision's ImageNet weights, teachers and students alike
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CNN_STUDENTS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50x2",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext26",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)),
)


class DoubleBottleneck(Bottleneck):
    """torchvision's Bottleneck with its output doubled too (8x ``planes``, not 4x); with
    ``width_per_group=128`` its inner width is doubled as well."""

    expansion = 8


def resnet50x2(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with every width doubled, the CAKD paper's ResNet50x2 (as in SimCLR): stem
    128, inner widths 128/256/512/1024, stage outputs 512/1024/2048/4096; 16.1 G multiply-adds
    at 224 by torch's count (the paper: 15.9), 98.0 M parameters. Not ``wide_resnet50_2``, which
    doubles the inner width only (:func:`resnet_x2`)."""
    return resnet_x2([3, 4, 6, 3], num_classes)


def resnet_x2(layers, num_classes: int = 1000, cls=ResNet) -> ResNet:
    """A bottleneck ResNet of ``layers`` blocks a stage with every width doubled, as an instance
    of ``cls`` (torchvision's ResNet or a subclass). Built from torchvision's ResNet and
    Bottleneck; its stem is hard-wired to 64 channels, so the stem and ``layer1`` (which reads it)
    are rebuilt at 128 and initialised as torchvision does."""
    model = cls(DoubleBottleneck, layers, num_classes=num_classes, width_per_group=128)
    model.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = model._norm_layer(128)
    model.inplanes = 128
    model.layer1 = model._make_layer(DoubleBottleneck, 64, layers[0])
    for module in (model.conv1, model.bn1, *model.layer1.modules()):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def resnext26(num_classes: int = 1000) -> ResNet:
    """ResNeXt-26 32x4d, the CAKD paper's anti-spoofing student (Table 4; its width is not
    given, 32x4d is ours): torchvision's ResNet with two bottlenecks a stage, 32 groups of width 4."""
    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes=num_classes, groups=32, width_per_group=4)


def inception_v3(num_classes: int = 1000) -> nn.Module:
    """torchvision's Inception-v3 without its auxiliary classifier (ours: the paper says nothing
    of it, and with it the training forward returns two outputs that no recipe reads), with
    torchvision's truncated-normal initialisation asked for (no warning). Inputs: 75x75 or more."""
    return torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)


# the students torchvision has no builder for, or whose builder needs other arguments
STUDENT_BUILDERS = {"resnet50x2": resnet50x2, "resnext26": resnext26, "inception_v3": inception_v3}
MIN_IMAGE_SIZE = {"inception_v3": 75}  # smaller inputs leave no pixel after its stride-2 stages
# students none of whose stages lands on a ViT/16 or Swin token grid (Inception-v3: 25, 12 and 5 at
# 224): the projectors read the stage nearest the grid, resized to it (docs/FIDELITY.md)
RESIZED_TO_GRID = (torchvision.models.Inception3,)


def check_student_input(name: str, image_size: int):
    """Refuse, in words, an input size the student cannot take (Inception-v3 below 75 pixels)."""
    if image_size < MIN_IMAGE_SIZE.get(name, 0):
        raise ValueError(f"{name} needs images of at least {MIN_IMAGE_SIZE[name]}x{MIN_IMAGE_SIZE[name]}, not {image_size}: raise the crop size")


# ----------------------------------------------------------------------------------------------
# The student's stages and head, and the teacher's token grid
# ----------------------------------------------------------------------------------------------
def head_name(model: nn.Module) -> str:
    """The classifier head: the model's last top-level child (``fc``, ``classifier``, ``heads``, ``head``)."""
    return list(model.named_children())[-1][0]


def classifier_key(model: nn.Module) -> str:
    """The state-dict prefix of the Linear that gives the logits (the head's last Linear)."""
    head = head_name(model)
    module = getattr(model, head)
    if isinstance(module, nn.Linear):
        return head
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}.{head} has no Linear layer: not a classification model")
    return f"{head}.{linears[-1]}"


def num_classes_of(model: nn.Module) -> int:
    return model.get_submodule(classifier_key(model)).out_features


def feature_stages(model: nn.Module):
    """``(name, module)`` of the top-level stages in execution order: the children of
    ``model.features`` where there is one (MobileNet, EfficientNet), else the model's own
    children (ResNet), the classifier head excluded."""
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Sequential):
        return [(f"features.{name}", module) for name, module in trunk.named_children()]
    head = head_name(model)
    return [(name, module) for name, module in model.named_children() if name != head]


@dataclass
class StudentLayout:
    """What a forward pass at ``image_size`` shows of a student: ``stages`` as
    ``(name, channels, height, width)`` in execution order (stages with a 4-d output only),
    the classifier ``head`` and the width ``pooled_dim`` of its input. ``resized``: a student
    of :data:`RESIZED_TO_GRID`, whose stage nearest a grid stands in for it."""

    model: str
    image_size: int
    stages: list
    head: str
    pooled_dim: int
    resized: bool = False

    def stage_for(self, grid: int):
        """``(name, channels)`` of the last stage whose output grid is ``grid`` x ``grid``; for a
        ``resized`` student, of the last stage whose grid is nearest to it (a tie: the larger
        grid), which its reader resizes to ``grid``."""
        found = [(name, channels) for name, channels, height, width in self.stages if (height, width) == (grid, grid)]
        if found:
            return found[-1]
        squares = [(abs(height - grid), -height, -i, name, channels)
                   for i, (name, channels, height, width) in enumerate(self.stages) if height == width and height > 1]
        if self.resized and squares:
            return min(squares)[3:]
        offered = {}
        for name, _, height, width in self.stages:
            if height > 1:
                offered[(height, width)] = name  # the last stage of each grid
        grids = ", ".join(f"{h}x{w} ({name})" for (h, w), name in offered.items()) or "none"
        raise ValueError(
            f"no stage of the {self.model} student gives the teacher's {grid}x{grid} token grid at "
            f"{self.image_size}x{self.image_size} input; its stages give {grids}: pick a teacher whose grid is one of these"
        )


def student_layout(student: nn.Module, image_size: int, name=None) -> StudentLayout:
    """The student's stage shapes, from one forward pass on the meta device (its weights and
    buffers replaced by meta tensors, in eval mode): no memory, no arithmetic, no per-model table."""
    shapes, head = [], head_name(student)
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: shapes.append((name, tuple(out.shape))))
        for name, module in feature_stages(student)
    ]
    pooled = []
    hooks.append(getattr(student, head).register_forward_pre_hook(lambda m, args: pooled.append(args[0].shape[-1])))
    was_training = student.training
    try:
        student.eval()
        state = {k: torch.empty_like(v, device="meta") for k, v in student.state_dict(keep_vars=True).items()}
        functional_call(student, state, (torch.empty(1, 3, image_size, image_size, device="meta"),))
    finally:
        student.train(was_training)
        for hook in hooks:
            hook.remove()
    stages = [(name, shape[1], shape[2], shape[3]) for name, shape in shapes if len(shape) == 4]
    return StudentLayout(name or type(student).__name__, image_size, stages, head, pooled[0], isinstance(student, RESIZED_TO_GRID))
