"""Builders for torchvision students and teachers by name, their weights, and the choice of
the student stage whose grid equals the teacher's token grid.

Students are torchvision CNNs (ResNet, Wide-ResNet, ResNeXt, MobileNet, EfficientNet); any
torchvision transformer of :data:`TEACHERS` may also be trained as a plain student (to
fine-tune a teacher). Teachers are ViTs and Swin Transformers (v1 and v2). The stage is
found by one rule, with no table per model: a forward pass on the meta device (no memory,
no arithmetic) records each stage's output shape, and the last stage whose grid is the
teacher's wins.
"""
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torchvision.models import SwinTransformer, VisionTransformer
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vision_transformer import interpolate_embeddings

from .checkpoint import load_error

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
    "mobilenet_v2",
    "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)),
)
VIT_TEACHERS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "deit_b")
SWIN_TEACHERS = ("swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t", "swin_v2_s", "swin_v2_b")
TEACHERS = VIT_TEACHERS + SWIN_TEACHERS
# what --model accepts: a CNN for every recipe, a transformer for the plain recipes (fine-tuning a teacher)
STUDENTS = CNN_STUDENTS + TEACHERS


def swin_l(num_classes: int = 1000, **kwargs) -> SwinTransformer:
    """Swin-L (window 7), which torchvision has the class but no builder for: embed 192,
    depths 2-2-18-2, heads 6-12-24-48. Weights come from the official release through
    ``scripts/convert_weights.py``. Stochastic depth 0.2, unused by an eval-mode teacher."""
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=[7, 7],
        stochastic_depth_prob=0.2,
        num_classes=num_classes,
        **kwargs,
    )


def deit_b(num_classes: int = 1000, image_size: int = 224, **kwargs) -> VisionTransformer:
    """DeiT-B (Touvron et al. 2021, no distillation token): a ViT-B/16, whose weights come
    from the official release through ``scripts/convert_weights.py``."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=num_classes,
        **kwargs,
    )


class DoubleBottleneck(Bottleneck):
    """torchvision's Bottleneck with its output doubled too (8x ``planes``, not 4x); with
    ``width_per_group=128`` its inner width is doubled as well."""

    expansion = 8


def resnet50x2(num_classes: int = 1000) -> ResNet:
    """ResNet-50 with every width doubled, the CAKD paper's ResNet50x2 (as in SimCLR): stem
    128, inner widths 128/256/512/1024, stage outputs 512/1024/2048/4096; 16.1 G multiply-adds
    at 224 by torch's count (the paper: 15.9), 98.0 M parameters. Not ``wide_resnet50_2``, which doubles the inner width only. Built from
    torchvision's ResNet and Bottleneck; its stem is hard-wired to 64 channels, so the stem and
    ``layer1`` (which reads it) are rebuilt at 128 and initialised as torchvision does."""
    model = ResNet(DoubleBottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=128)
    model.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = model._norm_layer(128)
    model.inplanes = 128
    model.layer1 = model._make_layer(DoubleBottleneck, 64, 3)
    for module in (model.conv1, model.bn1, *model.layer1.modules()):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


OWN_BUILDERS = {"swin_l": swin_l, "deit_b": deit_b, "resnet50x2": resnet50x2}
CONVERTED = ("swin_l", "deit_b")  # weights made from the official release by scripts/convert_weights.py


def architecture(name: str, num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    """A randomly initialised model by name (ViTs are built for ``image_size``)."""
    if name not in STUDENTS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(STUDENTS)}")
    kwargs = {"image_size": image_size} if name in VIT_TEACHERS else {}
    if name in OWN_BUILDERS:
        return OWN_BUILDERS[name](num_classes=num_classes, **kwargs)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def no_weights(weights) -> bool:
    """Whether ``weights`` asks for random weights: None, ``"none"`` or an empty string."""
    return weights is None or str(weights).lower() in ("", "none")


def build_student(name: str, num_classes: int = 1000, weights=None, image_size: int = 224) -> nn.Module:
    """A plain torchvision model, randomly initialised (the released recipes train from scratch).

    ``weights`` (a weights-enum member name such as ``"IMAGENET1K_V1"``, or a ``.pth`` path)
    initialises it instead: a classifier for another class count is left at its random
    initialisation, and a ViT's position embeddings are interpolated to ``image_size``.
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}: choose one of {', '.join(STUDENTS)}")
    model = architecture(name, num_classes, image_size)
    if not no_weights(weights):
        state = load_state_dict(name, weights, role="student")
        if isinstance(model, VisionTransformer):
            state = interpolate_embeddings(image_size, model.patch_size, state)
        head = classifier_key(model)
        if state.get(head + ".weight") is not None and state[head + ".weight"].shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith(head + ".") for key in missing):
            raise ValueError(f"weights {weights!r} do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def build_teacher(name: str, weights=None, image_size: int = 224, num_classes=None, progress: bool = True):
    """A ViT or Swin teacher in eval mode with frozen parameters.

    ``weights``: None (random, with a warning) or ``"none"`` (random, asked for: for smoke
    runs, no warning), a weights-enum member name such as
    ``"IMAGENET1K_V1"`` (downloaded once into torch's hub cache), or a path to a ``.pth``
    state dict (``swin_l`` and ``deit_b`` have no torchvision weights: convert the official
    release with ``scripts/convert_weights.py``). A ViT's position embeddings are
    interpolated when the weights were trained at another resolution than ``image_size``;
    a Swin teacher must see its whole last stage in one attention window.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}: choose one of {', '.join(TEACHERS)}")
    meta = check_teacher_input(name, image_size)
    patch_size = getattr(meta, "patch_size", None)
    state_dict = None
    if not no_weights(weights):
        state_dict = load_state_dict(name, weights, progress)
        head = classifier_key(meta)
        file_classes = state_dict[head + ".weight"].shape[0]
        if num_classes is not None and num_classes != file_classes:
            raise ValueError(f"teacher weights {weights!r} predict {file_classes} classes, not {num_classes}")
        num_classes = file_classes
        if name in VIT_TEACHERS:
            state_dict = interpolate_embeddings(image_size, patch_size, state_dict)
    model = architecture(name, num_classes or 1000, image_size)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif weights is None:
        warnings.warn(f"teacher {name} has random weights: fine for smoke runs, meaningless for distillation")
    return freeze(model)


def check_teacher_input(name: str, image_size: int) -> nn.Module:
    """Refuse, in words, an input size the teacher cannot take (torchvision's ViT only asserts):
    a ViT's must be a multiple of its patch, a Swin's last stage must fit one attention window.
    Returns the architecture on the meta device (its sizes, no memory or arithmetic)."""
    meta = _meta(name)
    if name in VIT_TEACHERS:
        patch = meta.patch_size
        if image_size % patch:
            lower, upper = max(patch, image_size // patch * patch), (image_size // patch + 1) * patch
            raise ValueError(
                f"image size {image_size} is not a multiple of {name}'s patch size {patch}: "
                f"use a crop size such as {lower}" + (f" or {upper}" if upper != lower else "")
            )
    else:
        swin_grid(meta, image_size, name)  # raises when one window cannot cover the grid
    return meta


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _meta(name):
    with torch.device("meta"):
        return architecture(name)


def load_state_dict(name: str, weights, progress: bool = True, role: str = "teacher"):
    """A model's state dict from a local file (a state dict, or a checkpoint holding one under
    ``model`` or ``state_dict``) or a torchvision weights-enum member of ``name``; ``role``
    (teacher, student) names it in errors."""
    weights = str(weights)
    if weights.endswith((".pth", ".pt")) or os.sep in weights:
        if not os.path.isfile(weights):
            hint = ""
            if name in CONVERTED:
                hint = f": make it with python scripts/convert_weights.py --arch {name} --input OFFICIAL.pth --output {weights}"
            raise FileNotFoundError(f"{role} weights file {weights} does not exist{hint}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # a broken file, or a pickle of other objects
            raise ValueError(f"{role} weights file {weights} cannot be read ({load_error(error)}): pass a state dict .pth") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        head = classifier_key(_meta(name)) + ".weight"
        if not isinstance(state, dict) or head not in state:
            raise ValueError(f"{weights} is not a state dict of {name} (no {head})")
        return dict(state)
    if name in OWN_BUILDERS:
        how = f"convert the official release with scripts/convert_weights.py --arch {name} and " if name in CONVERTED else ""
        raise ValueError(f"torchvision has no {name} weights: {how}pass the .pth file")
    enum = torchvision.models.get_model_weights(name)
    try:
        member = enum[weights]
    except KeyError:
        members = ", ".join(enum.__members__)
        raise ValueError(f"unknown weights {weights!r} for {name}: use one of {members}, none, or a .pth path") from None
    try:
        return member.get_state_dict(progress=progress, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch: all mean "no usable file"
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(member.url))
        raise RuntimeError(
            f"could not download {name} {weights} weights from {member.url} ({type(error).__name__}: {error}); "
            f"offline, put that file at {target} or pass a local .pth path as the weights"
        ) from None


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
    the classifier ``head`` and the width ``pooled_dim`` of its input."""

    model: str
    image_size: int
    stages: list
    head: str
    pooled_dim: int

    def stage_for(self, grid: int):
        """``(name, channels)`` of the last stage whose output grid is ``grid`` x ``grid``."""
        found = [(name, channels) for name, channels, height, width in self.stages if (height, width) == (grid, grid)]
        if found:
            return found[-1]
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
    return StudentLayout(name or type(student).__name__, image_size, stages, head, pooled[0])


def match_stage(student: nn.Module, grid: int, image_size: int):
    """``(name, channels)`` of the last stage whose output grid is ``grid`` x ``grid`` (ResNet
    ``layer3`` for /16 teachers at 224, ``layer4`` for /32 and Swin; MobileNetV2
    ``features.13`` / ``features.18``; EfficientNet-B0 ``features.5`` / ``features.8``)."""
    return student_layout(student, image_size).stage_for(grid)


def token_grid(teacher: nn.Module, image_size: int, name=None) -> int:
    """The side of the teacher's token grid at ``image_size``: a ViT's ``image_size / patch``,
    a Swin's last stage (:func:`swin_grid`)."""
    if isinstance(teacher, SwinTransformer):
        return swin_grid(teacher, image_size, name)
    return image_size // teacher.patch_size


def check_pair(student: str, teacher: str, image_size: int):
    """Raise the distiller's error for a pair of model names whose grids cannot meet, before
    anything is built or downloaded (both are looked at on the meta device)."""
    check_teacher_input(teacher, image_size)
    with torch.device("meta"):
        grid = token_grid(architecture(teacher, image_size=image_size), image_size, teacher)
        student_layout(architecture(student), image_size, student).stage_for(grid)


def swin_grid(teacher: SwinTransformer, image_size: int, name=None) -> int:
    """The last stage's grid of a Swin teacher at ``image_size``, which its attention window
    must cover (then the attention, and so the score map, is global)."""
    out = functional_call(
        teacher.features,
        {k: torch.empty_like(v, device="meta") for k, v in teacher.features.state_dict(keep_vars=True).items()},
        (torch.empty(1, 3, image_size, image_size, device="meta"),),
    )
    height, width = out.shape[1:3]
    window = teacher.features[-1][-1].attn.window_size
    if height > window[0] or width > window[1]:
        raise ValueError(
            f"{name or 'the Swin teacher'}'s last stage is {height}x{width} at {image_size}x{image_size} input, larger than "
            f"its {window[0]}x{window[1]} attention window, so its attention is not global: use an input of at most "
            f"{32 * window[0]}x{32 * window[1]}"
        )
    return height
