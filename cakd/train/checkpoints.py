"""The training checkpoint, in one place: its keys, a run's parts written into it and loaded
back, reading and checking the file, and the other kinds of file the scripts take (a
released-code checkpoint, a plain student state dict): :class:`SourceCheckpoint`.

The trainer, :mod:`resume` and every script go through this module. ``cakd/weights.py``
(the method) converts and exports weights; this is the training system's file around them.
Its keys and their format stay as they are: a checkpoint of an earlier version resumes
(``tests/test_old_checkpoint.py``).
"""
import argparse
import dataclasses
import os
import pickle
import random
import textwrap
import zipfile

import numpy as np
import torch

from ..weights import load_error, split_reference_state_dict, strip_prefix
from ..errors import CakdError
from .report import one_line

# A run's parts, each saved as its state dict (None where the run has no such part): the
# student, its projectors, the discriminator, both optimizers and schedules, the AMP scaler, the EMA.
PARTS = ("model", "projectors", "discriminator", "optimizer", "lr_scheduler", "disc_optimizer", "disc_lr_scheduler",
         "scaler", "model_ema")
# Where the run stands: the epoch (trained whole, or stopped in at ``step``, None at an epoch's
# end), the run's flags as a dict, and every process's RNG states (:func:`capture_rng_state`).
POSITION = ("epoch", "step", "args", "rng")
KEYS = PARTS + POSITION
# Only in a checkpoint saved at an epoch's end whose evaluation a stop cut short: that epoch's
# training averages; a resume evaluates the epoch first and writes its metrics.jsonl line.
UNEVALUATED = "unevaluated"
REQUIRED = ("model", "optimizer", "lr_scheduler", "epoch", "args")  # in every checkpoint the trainer ever wrote
LEARNED = ("model", "projectors", "discriminator", "optimizer", "disc_optimizer", "model_ema")  # what a step changes


class CheckpointError(CakdError):
    """A checkpoint that is missing, unreadable, of another kind or of another run; the message says what to do."""


@dataclasses.dataclass
class Parts:
    """What a training checkpoint saves of a run. ``distiller`` gives the student (``model``),
    its projectors and the discriminator; a part the run has not is None."""

    distiller: object
    optimizer: object = None
    lr_scheduler: object = None
    disc_optimizer: object = None
    disc_lr_scheduler: object = None
    scaler: object = None
    ema: object = None

    def _stateful(self):
        """Key -> the object whose ``state_dict`` it holds (student and projectors apart: one module)."""
        return {
            "discriminator": self.distiller.discriminator,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "disc_optimizer": self.disc_optimizer,
            "disc_lr_scheduler": self.disc_lr_scheduler,
            "scaler": self.scaler,
            "model_ema": self.ema,
        }

    def state_dict(self, epoch, step, args, rng):
        """The checkpoint dict (:data:`KEYS`). ``args``: the run's flags as a dict; ``rng``: every
        process's :func:`capture_rng_state`, by rank."""
        d = self.distiller
        state = {"model": d.student.state_dict(), "projectors": d.trainable.projector_state_dict()}
        state.update({key: None if obj is None else obj.state_dict() for key, obj in self._stateful().items()})
        state.update(epoch=epoch, step=step, args=args, rng=rng)
        return state

    def load(self, checkpoint, path, test_only=False):
        """Load a checkpoint (:func:`read`) into the parts, strictly; ``test_only``: the student
        and its EMA alone, what an evaluation needs. One :class:`CheckpointError` if it does not fit."""
        d = self.distiller
        try:
            d.student.load_state_dict(checkpoint["model"])
            if test_only:
                if self.ema is not None and checkpoint.get("model_ema") is not None:
                    self.ema.load_state_dict(checkpoint["model_ema"])
                return
            d.trainable.load_state_dict(d.trainable.joined(checkpoint["model"], checkpoint["projectors"]))
            for key, obj in self._stateful().items():
                if obj is not None:
                    if checkpoint.get(key) is None:
                        raise CheckpointError(f"{path} holds no {key} state, which this run needs: resume with the same flags")
                    obj.load_state_dict(checkpoint[key])
        except (RuntimeError, ValueError, KeyError) as error:  # shapes or keys of other flags
            raise CheckpointError(
                f"{path} does not fit this run ({textwrap.shorten(one_line(error), 300, placeholder=' ...')}): "
                "resume with the flags it was trained with (its config.yaml)"
            ) from None


def capture_rng_state():
    """This process's RNG states (torch, CUDA, numpy, random), in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def restore_rng(checkpoint, rank, world_size):
    """Give process ``rank`` the RNG states it saved in ``checkpoint``. Returns how many
    processes wrote it: another count than ``world_size`` restores nothing (the streams restart)."""
    rng = checkpoint.get("rng") or []
    if len(rng) == world_size:
        restore_rng_state(rng[rank])
    return len(rng)


def next_position(checkpoint):
    """(epoch, step) a run resumed from ``checkpoint`` starts at: where a mid-epoch save
    stopped, else the start of the next epoch."""
    if checkpoint.get("step") is not None:
        return checkpoint["epoch"], checkpoint["step"]
    return checkpoint["epoch"] + 1, 0


def _load(path, flag=None, mmap=False):
    """The file's contents, tensors on the CPU, nothing but tensors and plain types unpickled;
    one :class:`CheckpointError` if it cannot be read (``flag``: the option that named it)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path" + (f" given to {flag}" if flag else ""))
    if mmap and not zipfile.is_zipfile(path):  # torch maps only its zip format; a raw pickle is read whole
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, pickle garbage, wrong format, a crafted pickle
        what = "it is not a checkpoint cakd wrote" if isinstance(error, pickle.UnpicklingError) else "it is corrupt or truncated"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({load_error(error)}): {what}; "
            "resume from an earlier model_<epoch>.pth in the same folder"
        ) from None


def read(path, flag="--resume", mmap=False):
    """A training checkpoint written by the trainer, checked to be one. ``mmap``: map the file
    instead of reading it (its args alone cost nothing)."""
    checkpoint = _load(path, flag, mmap)
    missing = [key for key in REQUIRED if key not in checkpoint] if isinstance(checkpoint, dict) else REQUIRED
    if missing:
        raise CheckpointError(f"{path} is not a cakd training checkpoint (no {', '.join(missing)})")
    return checkpoint


def finished(path):
    """Whether the run that wrote ``path`` trained its last epoch to the end (not stopped
    mid-way by a SIGTERM or a crash). Reads the file memory-mapped: no tensor is loaded."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError):
        return False
    return next_position(checkpoint)[0] >= checkpoint["args"]["epochs"] and checkpoint.get(UNEVALUATED) is None


class SourceCheckpoint:
    """One file a script is pointed at, read once, whatever produced it.

    ``kind``: ``"training"`` (a training checkpoint of this package: ``model``, ``projectors``,
    ``model_ema``, ...), ``"released"`` (the authors' code: student and projector keys in one
    ``model`` state dict) or ``"student"`` (a plain torchvision state dict, e.g. an export).
    ``args``: the flags the run was trained with, as a dict (empty when the file has none).
    """

    def __init__(self, path):
        self.path = path
        # the released code saved its argparse.Namespace; allow that one class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            contents = _load(path)
        if isinstance(contents, dict) and isinstance(contents.get("model"), dict):
            self.kind = "training" if "projectors" in contents else "released"
        elif _is_state_dict(contents):
            self.kind = "student"
        else:
            raise CheckpointError(
                f"{path} is neither a cakd checkpoint, a released-code checkpoint nor a student state dict"
            )
        self.contents = contents
        args = contents.get("args") if self.kind != "student" else None
        self.args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})

    def student_state(self, which="student"):
        """The torchvision student's state dict: the trained weights or their EMA."""
        if which not in ("student", "ema"):
            raise ValueError(f"which must be 'student' or 'ema', not {which!r}")
        if self.kind == "student":
            if which == "ema":
                raise CheckpointError(f"{self.path} is a plain student state dict: it has no EMA (use --which student)")
            return dict(self.contents)
        source = self.contents["model"] if which == "student" else self.contents.get("model_ema")
        if source is None:
            raise CheckpointError(f"{self.path} has no EMA: the run was trained without --model-ema (use --which student)")
        if which == "ema":
            source = _unwrap_ema(source)
        if self.kind == "released":
            return split_reference_state_dict(source)[0]
        return dict(source)

    def projector_state(self):
        """The attention, group-wise and token projectors, keyed as in ``StudentWithProjectors``
        (empty for a baseline or logits run, or an exported student)."""
        if self.kind == "training":
            return dict(self.contents.get("projectors") or {})
        if self.kind == "released":
            return split_reference_state_dict(self.contents["model"])[1]
        return {}

    def recipe(self):
        """The recipe the run was trained with (a released-code checkpoint with projectors: cakd)."""
        saved = self.args.get("recipe")
        return saved or ("cakd" if self.projector_state() else "baseline")


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_ema(state):
    """An ``AveragedModel`` state dict (``n_averaged`` plus ``module.*``) as the module's own."""
    return strip_prefix({k: v for k, v in state.items() if k != "n_averaged"})
