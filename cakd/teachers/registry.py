"""The teacher registry, a leaf: teacher names to their families, and what the rest of the
package asks of a teacher (its grid, its taps, whether an input size fits).

Each family is one module (:mod:`.vit`: ViT and DeiT-B; :mod:`.swin`: Swin v1, v2 and Swin-L)
over the protocol in :mod:`.base`, registered here with :func:`register_teacher_family`; a
user's module registers its own family the same way. This module imports no family: an
unknown name is one error listing the registered ones. Building and loading a teacher by
name is :mod:`cakd.zoo`'s.
"""
from collections.abc import Sequence

import torch
from torch import nn

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


def teacher_family(name: str) -> TeacherFamily:
    """The family registered under ``name``; a ValueError listing the registered names for any other."""
    family = REGISTRY.get(name)
    if family is None:
        raise ValueError(f"unknown teacher {name!r}: choose one of {', '.join(REGISTRY)}")
    return family


def check_teacher_input(name: str, image_size: int) -> nn.Module:
    """Refuse, in words, an input size the teacher cannot take (torchvision's ViT only
    asserts), before anything is built or downloaded. Returns the architecture on the meta
    device (its sizes, no memory or arithmetic)."""
    family = teacher_family(name)
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
