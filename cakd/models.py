"""Builders for the torchvision student (ResNet) and teacher (ViT), and the choice of
the student stage whose spatial grid equals the teacher's token grid."""
import os
import warnings

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet, SwinTransformer, VisionTransformer
from torchvision.models.vision_transformer import interpolate_embeddings

# the normalization of torchvision's ImageNet weights, teachers and students alike
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STUDENTS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
TEACHERS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def swin_l(num_classes: int = 1000) -> SwinTransformer:
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
    )


def deit_b(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
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
    )


def build_student(name: str, num_classes: int = 1000) -> ResNet:
    """A plain, randomly initialised torchvision ResNet (the released recipe trains from scratch)."""
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}: choose one of {', '.join(STUDENTS)}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def build_teacher(name: str, weights=None, image_size: int = 224, num_classes=None, progress: bool = True):
    """A torchvision ViT in eval mode with frozen parameters.

    ``weights``: None (random, for smoke runs), a weights-enum member name such as
    ``"IMAGENET1K_V1"`` (downloaded once into torch's hub cache), or a path to a
    ``.pth`` state dict. Position embeddings are interpolated when the weights were
    trained at another resolution than ``image_size``.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}: choose one of {', '.join(TEACHERS)}")
    builder = torchvision.models.get_model_builder(name)
    patch_size = int(name.rsplit("_", 1)[1])
    if image_size % patch_size:
        raise ValueError(
            f"image size {image_size} is not a multiple of {name}'s patch size {patch_size}: "
            f"use a crop size such as {max(patch_size, image_size // patch_size * patch_size)}"
        )
    state_dict = None
    if weights is not None:
        state_dict = load_teacher_state_dict(name, weights, progress)
        file_classes = state_dict["heads.head.weight"].shape[0]
        if num_classes is not None and num_classes != file_classes:
            raise ValueError(f"teacher weights {weights!r} predict {file_classes} classes, not {num_classes}")
        num_classes = file_classes
        state_dict = interpolate_embeddings(image_size, patch_size, state_dict)
    model = builder(weights=None, image_size=image_size, num_classes=num_classes or 1000)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    else:
        warnings.warn(f"teacher {name} has random weights: fine for smoke runs, meaningless for distillation")
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher_state_dict(name: str, weights, progress: bool = True):
    """The teacher's state dict from a local file or a torchvision weights enum member."""
    weights = str(weights)
    if weights.endswith((".pth", ".pt")) or os.sep in weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"teacher weights file {weights} does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if "heads.head.weight" not in state:
            raise ValueError(f"{weights} is not a torchvision VisionTransformer state dict (no heads.head.weight)")
        return dict(state)
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
            f"offline, put that file at {target} or pass a local .pth path as the teacher weights"
        ) from None


def _conv_out(size: int, conv) -> int:
    def pair(v):
        return v if isinstance(v, tuple) else (v, v)

    kernel, stride, padding = pair(conv.kernel_size)[0], pair(conv.stride)[0], pair(conv.padding)[0]
    return (size + 2 * padding - kernel) // stride + 1


def stage_grids(student: ResNet, image_size: int) -> dict:
    """Spatial size of each ResNet stage output for a square input, by conv arithmetic."""
    size = _conv_out(_conv_out(image_size, student.conv1), student.maxpool)
    grids = {}
    for stage in STAGES:
        first_block = getattr(student, stage)[0]
        for name, module in first_block.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("downsample"):
                size = _conv_out(size, module)
        grids[stage] = size
    return grids


def stage_channels(student: ResNet, stage: str) -> int:
    last_block = getattr(student, stage)[-1]
    last_bn = [m for m in last_block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    return last_bn.num_features


def teacher_grid(teacher: VisionTransformer) -> int:
    return teacher.image_size // teacher.patch_size


def match_stage(student: nn.Module, teacher: nn.Module) -> str:
    """The student stage whose grid equals the teacher's token grid (layer3 for /16, layer4 for /32)."""
    if not isinstance(student, ResNet):
        raise TypeError(f"the student must be a torchvision ResNet, got {type(student).__name__}")
    if not isinstance(teacher, VisionTransformer):
        raise TypeError(f"the teacher must be a torchvision VisionTransformer, got {type(teacher).__name__}")
    grid = teacher_grid(teacher)
    grids = stage_grids(student, teacher.image_size)
    for stage, size in grids.items():
        if size == grid:
            return stage
    found = ", ".join(f"{stage} {size}x{size}" for stage, size in grids.items())
    raise ValueError(
        f"no student stage matches the teacher's {grid}x{grid} token grid at {teacher.image_size}x{teacher.image_size} "
        f"input (student stages: {found}); use a teacher with patch size 16 or 32"
    )
