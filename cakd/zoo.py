"""Any model by name: students and registered teachers built, their weights loaded by name
(a torchvision weights-enum member, a local ``.pth``, or none), and the pair checks.

This module stands above :mod:`cakd.students` (what is the student's alone) and the teacher
families (:mod:`cakd.teachers`); neither
imports it.
"""
import os
import warnings

import torch
import torchvision
from torch import nn

from .students import CNN_STUDENTS, STUDENT_BUILDERS, check_student_input, classifier_key, student_layout
# importing cakd.teachers.registry imports the package cakd.teachers first, which registers the built-in families
from .teachers.registry import TEACHERS, check_teacher_input, family_of, teacher_family, token_grid
from .weights import load_error, load_torchvision_weights


def student_names() -> tuple:
    """What ``--model`` accepts: a CNN for every recipe, a registered teacher
    for the plain recipes (fine-tuning a teacher)."""
    return CNN_STUDENTS + tuple(TEACHERS)


def architecture(name: str, num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    """A randomly initialised model by name (a teacher built by its family, for ``image_size``)."""
    family = family_of(name)
    if family is not None:
        return family.build(name, num_classes, image_size)
    if name not in CNN_STUDENTS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(student_names())}")
    if name in STUDENT_BUILDERS:
        return STUDENT_BUILDERS[name](num_classes=num_classes)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def no_weights(weights) -> bool:
    """Whether ``weights`` asks for random weights: None, ``"none"`` or an empty string."""
    return weights is None or str(weights).lower() in ("", "none")


def build_student(name: str, num_classes: int = 1000, weights=None, image_size: int = 224) -> nn.Module:
    """A plain torchvision model, randomly initialised (the released recipes train from scratch).

    ``weights`` (a weights-enum member name such as ``"IMAGENET1K_V1"``, or a ``.pth`` path)
    initialises it instead: a classifier for another class count is left at its random
    initialisation, and a teacher's family adapts them to ``image_size`` (a ViT's position
    embeddings are interpolated).
    """
    if name not in student_names():
        raise ValueError(f"unknown student {name!r}: choose one of {', '.join(student_names())}")
    check_student_input(name, image_size)
    model = architecture(name, num_classes, image_size)
    if not no_weights(weights):
        state = load_state_dict(name, weights, role="student")
        family = family_of(name)
        if family is not None:
            state = family.adapt_state_dict(state, model, image_size)
        head = classifier_key(model)
        if state.get(head + ".weight") is not None and state[head + ".weight"].shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith(head + ".") for key in missing):
            raise ValueError(f"weights {weights!r} do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _meta(name):
    with torch.device("meta"):
        return architecture(name)


def load_state_dict(name: str, weights, progress: bool = True, role: str = "teacher"):
    """A model's state dict from a local file (a state dict, or a checkpoint holding one under
    ``model`` or ``state_dict``) or a torchvision weights-enum member of ``name``; ``role``
    (teacher, student) names it in errors."""
    converted = name in getattr(family_of(name), "converted", ())  # made by scripts/convert_weights.py
    weights = str(weights)
    if weights.endswith((".pth", ".pt")) or os.sep in weights:
        if not os.path.isfile(weights):
            hint = ""
            if converted:
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
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:  # a model of our own (resnet50x2, deit_b, swin_l, a plug-in's)
        how = f"convert the official release with scripts/convert_weights.py --arch {name} and " if converted else ""
        raise ValueError(f"torchvision has no {name} weights: {how}pass the .pth file") from None
    try:
        member = enum[weights]
    except KeyError:
        members = ", ".join(enum.__members__)
        raise ValueError(f"unknown weights {weights!r} for {name}: use one of {members}, none, or a .pth path") from None
    return load_torchvision_weights(name, weights, member.url, progress)


def own_builders() -> dict:
    """Every model torchvision has no builder for, by name: the students' own and each
    registered family's (``resnet50x2``, ``deit_b``, ``swin_l``, a plug-in's)."""
    return {**STUDENT_BUILDERS, **{n: b for family in dict.fromkeys(map(family_of, TEACHERS)) for n, b in family.builders.items()}}


def build_teacher(name: str, weights=None, image_size: int = 224, num_classes=None, progress: bool = True):
    """A registered teacher in eval mode with frozen parameters.

    ``weights``: None (random, with a warning) or ``"none"`` (random, asked for: for smoke
    runs, no warning), a weights-enum member name such as ``"IMAGENET1K_V1"`` (downloaded once
    into torch's hub cache), or a path to a ``.pth`` state dict (``swin_l`` and ``deit_b`` have
    no torchvision weights: convert the official release with ``scripts/convert_weights.py``).
    The family adapts the weights to ``image_size`` (a ViT's position embeddings are
    interpolated) and refuses a size it cannot take (a Swin must see its whole last stage in
    one attention window).
    """
    family = teacher_family(name)
    meta = check_teacher_input(name, image_size)
    state_dict = None
    if not no_weights(weights):
        state_dict = load_state_dict(name, weights, progress)
        file_classes = state_dict[classifier_key(meta) + ".weight"].shape[0]
        if num_classes is not None and num_classes != file_classes:
            raise ValueError(f"teacher weights {weights!r} predict {file_classes} classes, not {num_classes}")
        num_classes = file_classes
        state_dict = family.adapt_state_dict(state_dict, meta, image_size)
    model = family.build(name, num_classes or 1000, image_size)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif weights is None:
        warnings.warn(f"teacher {name} has random weights: fine for smoke runs, meaningless for distillation")
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_pair(student: str, teacher: str, image_size: int):
    """Raise the distiller's error for a pair of model names whose grids cannot meet, before
    anything is built or downloaded (both are looked at on the meta device)."""
    grid = token_grid(check_teacher_input(teacher, image_size), image_size, teacher)
    check_student_input(student, image_size)
    with torch.device("meta"):
        student_layout(architecture(student), image_size, student).stage_for(grid)
