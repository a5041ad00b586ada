"""Teacher families by name: the registry, and what the rest of the package asks of a teacher.

Each family is one module (:mod:`.vit`: ViT and DeiT-B; :mod:`.swin`: Swin v1, v2 and Swin-L)
over the protocol in :mod:`.base`, registered with :func:`register_teacher_family`; a user's
module registers its own family the same way. Nothing here knows a family: an unknown name is
one error listing the registered ones.
"""
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..students import architecture, classifier_key, load_state_dict, no_weights, student_layout
from .base import TeacherFamily, TeacherTaps

REGISTRY = {}  # teacher name -> its family (an instance), in registration order


def register_teacher_family(cls):
    """Class decorator: register an instance of the :class:`TeacherFamily` subclass ``cls``
    under each of its ``names``, which must be new. Returns ``cls``."""
    family = cls()
    taken = [name for name in family.names if name in REGISTRY]
    if taken:
        raise ValueError(f"teacher {', '.join(taken)} is already registered: give {cls.__name__} other names")
    for name in family.names:
        REGISTRY[name] = family
    return cls


class _Names(Sequence):
    """The registered teacher names in registration order: a live, read-only view (so a
    family registered after import, by a plug-in, is listed too)."""

    def __getitem__(self, index):
        return list(REGISTRY)[index]

    def __len__(self):
        return len(REGISTRY)

    def __repr__(self):
        return repr(tuple(REGISTRY))


TEACHERS = _Names()


def family_of(model_or_name):
    """The :class:`TeacherFamily` of a teacher name or a built model; None for anything else (a CNN)."""
    if isinstance(model_or_name, str):
        return REGISTRY.get(model_or_name)
    families = list(dict.fromkeys(REGISTRY.values()))
    for cls in type(model_or_name).__mro__:
        for family in families:
            if family.model_class is cls:
                return family
    return None


def _family(name: str) -> TeacherFamily:
    family = REGISTRY.get(name)
    if family is None:
        raise ValueError(f"unknown teacher {name!r}: choose one of {', '.join(REGISTRY)}")
    return family


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
    family = _family(name)
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


def check_teacher_input(name: str, image_size: int) -> nn.Module:
    """Refuse, in words, an input size the teacher cannot take (torchvision's ViT only
    asserts), before anything is built or downloaded. Returns the architecture on the meta
    device (its sizes, no memory or arithmetic)."""
    family = _family(name)
    with torch.device("meta"):
        meta = family.build(name)
    family.token_grid(meta, image_size, name)
    return meta


def token_grid(teacher: nn.Module, image_size: int, name=None) -> int:
    """The side of ``teacher``'s token grid at ``image_size`` (its family's rule)."""
    return _family_of_model(teacher).token_grid(teacher, image_size, name)


def teacher_taps(teacher: nn.Module, image_size: int, attention: bool = True, tokens: bool = True, qkv: bool = False,
                 fold: str = "auto") -> TeacherTaps:
    """The family's :class:`~.base.TeacherTaps` on ``teacher`` at ``image_size``."""
    return _family_of_model(teacher).taps(teacher, image_size, attention, tokens, qkv, fold)


def check_pair(student: str, teacher: str, image_size: int):
    """Raise the distiller's error for a pair of model names whose grids cannot meet, before
    anything is built or downloaded (both are looked at on the meta device)."""
    grid = token_grid(check_teacher_input(teacher, image_size), image_size, teacher)
    with torch.device("meta"):
        student_layout(architecture(student), image_size, student).stage_for(grid)


def _family_of_model(model: nn.Module) -> TeacherFamily:
    family = family_of(model)
    if family is None:
        kinds, root = [], None
        for cls in dict.fromkeys(family.model_class for family in REGISTRY.values()):
            package = cls.__module__.split(".")[0]
            kinds.append(cls.__name__ if package == root else f"{package} {cls.__name__}")
            root = package
        raise TypeError(f"the teacher must be a {' or '.join(kinds)}, got {type(model).__name__}")
    return family


# the built-in families, registered in the order --teacher lists them
from . import vit, swin  # noqa: E402, F401
