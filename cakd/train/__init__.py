"""The training system around the method: flags and YAML, data, optimizers, the training
loop, torchrun, logging and the tools that read a run back. ``python -m cakd.train`` runs it.

The method itself (``cakd``: taps, models, projectors, discriminator, distillers) never
imports from here: a trainer of your own needs only ``cakd``.
"""
from .trainer import main

__all__ = ["main"]
