"""The methods, one module each, and their registry.

``build_distiller(name, student, teacher, ...)`` builds any registered method;
:func:`register_distiller` adds one (a module of this package, or a user's own module loaded
with ``python -m cakd.train --plugin MODULE``). ``docs/extending.md`` shows a complete one.
"""
from ..discriminator import PatchGAN, TokenMLP
from .base import (
    DISTILLERS,
    BaselineConfig,
    Distiller,
    StudentWithProjectors,
    build_distiller,
    check_classes,
    config_choices,
    distiller_class,
    make_config,
    mse,
    register_distiller,
    relative_mse,
)
from .baseline import BaselineDistiller
from .logits import KDConfig, KDDistiller, LogitsConfig, LogitsDistiller
from .cakd import CAKDConfig, CAKDDistiller, ZeroGradients  # noqa: I001 (registration order: the --help order)
from .rkd import RKDConfig, RKDDistiller, StudentFeatures
from .irg import IRGConfig, IRGDistiller

__all__ = [
    "DISTILLERS",
    "BaselineConfig",
    "BaselineDistiller",
    "CAKDConfig",
    "CAKDDistiller",
    "IRGConfig",
    "IRGDistiller",
    "Distiller",
    "KDConfig",
    "KDDistiller",
    "LogitsConfig",
    "LogitsDistiller",
    "PatchGAN",
    "RKDConfig",
    "RKDDistiller",
    "StudentFeatures",
    "StudentWithProjectors",
    "TokenMLP",
    "ZeroGradients",
    "build_distiller",
    "check_classes",
    "config_choices",
    "distiller_class",
    "make_config",
    "mse",
    "register_distiller",
    "relative_mse",
]
