"""Writing a run's checkpoints, for every trainer, and what may not be written.

Rank 0 writes ``model_{epoch}.pth`` (every ``--checkpoint-freq`` epochs) and ``checkpoint.pth``
atomically, the epoch's ``metrics.jsonl`` line staged before them and renamed into place after
(a full disk loses neither, or both); every rank agrees on the outcome. A state that diverged
(:func:`nonfinite_part`, :func:`loss_divergence`) is refused before anything is written, with the
checkpoint that is kept and what to change named in one line.
"""
import math
import os

import torch

from . import distributed as dist_utils
from ..weights import save_atomic, stage_text
from .engine import TrainingError
from .report import UserError, one_line
from .metrics_file import metrics_text, read_metrics


def nonfinite_part(state, keys):
    """``"non-finite values in the KEY state"`` for the first of ``keys`` of the checkpoint dict
    ``state`` holding a NaN or inf (weights, buffers, optimizer state: a NaN guard on the loss
    alone misses them), or None."""
    for key in keys:
        tensors = [t for t in _tensors(state.get(key)) if t.is_floating_point()]
        if tensors and not all(torch.isfinite(t).all() for t in tensors):
            return f"non-finite values in the {key} state"
    return None


def loss_divergence(mean, num_classes, limit):
    """Why an epoch's mean training loss ``mean`` is divergence, or None: more than ``limit``
    (``--max-loss-growth``; 0: no check) times the run's loss scale, ln(classes).

    ln(classes) is the cross-entropy of a uniform guess: where a run starts and what a run that
    learns falls below, so a converged run's batch-to-batch noise never reads as growth, and it
    depends on nothing measured: a resume, from any point, checks against the same scale, and the
    checkpoint needs no entry for it (the README says why not the first loss)."""
    scale = math.log(num_classes)
    if limit and scale and mean > limit * scale:
        return (f"the training loss diverged: the epoch's mean {mean:.4g} is {mean / scale:.3g} times the run's loss scale "
                f"ln({num_classes}) = {scale:.4g} (--max-loss-growth {limit:g})")
    return None


class CheckpointWriter:
    """A run's checkpoints in ``output_dir`` (None: none written): :meth:`write` them, say which
    one is :meth:`kept`, :meth:`refuse` a diverged state."""

    def __init__(self, output_dir, checkpoint_freq=1):
        self.output_dir, self.checkpoint_freq = output_dir, checkpoint_freq
        self.saved = None  # (epoch, step) of the checkpoint this run wrote last

    def path(self):
        return os.path.join(self.output_dir or ".", "checkpoint.pth")

    def kept(self):
        """Which checkpoint a run that stops now leaves behind, in words."""
        if not self.output_dir or not os.path.isfile(self.path()):
            return "no checkpoint was written yet" + ("" if self.output_dir else " (no --output-dir)")
        if self.saved is None:
            return f"{self.path()}, from before this run, is kept"
        epoch, step = self.saved
        return f"{self.path()} (epoch {epoch}{'' if step is None else f', step {step}'}) is kept"

    def refuse(self, problems, epoch, step=None):
        """Raise :class:`TrainingError` for the first of every rank's ``problems`` (one gathered
        value each: a reason or None); return when there is none. A resume would replay the same
        steps, so the line names what to change instead."""
        problem = next((p for p in dist_utils.all_gather_object(problems) if p), None)
        if problem is None:
            return
        where = f"epoch {epoch}" + ("" if step is None else f" step {step}")
        restart = (f"start a new run in another --output-dir from its weights (--weights {self.path()})"
                   if os.path.isfile(self.path()) else "start again")
        raise TrainingError(
            f"{problem} in {where}: not saved, {self.kept()}; --resume auto would replay the same steps and stop here again: "
            f"{restart} with a lower --lr or with --clip-grad-norm"
            + ("" if problem.startswith("non-finite") else ", or resume with a larger --max-loss-growth if the growth is expected")
        )

    def write(self, state, epoch, step=None, record=None):
        """Rank 0 writes ``state``; every rank agrees on the outcome (one :class:`UserError` line
        if the disk is full or the folder not writable). ``model_{epoch}.pth`` goes first: a kill
        between the two leaves the previous ``checkpoint.pth``, from which ``--resume auto`` trains
        the epoch again and writes both. ``record``: the epoch's ``metrics.jsonl`` line."""
        error = None
        if dist_utils.is_main_process() and self.output_dir:
            paths = [self.path()]
            # model_{epoch}.pth only on the frequency: at the end checkpoint.pth is the last state, and a
            # second full copy of it (hundreds of MB for a two-epoch quickstart) would keep nothing more
            if step is None and (epoch + 1) % self.checkpoint_freq == 0:
                paths.insert(0, os.path.join(self.output_dir, f"model_{epoch}.pth"))
            metrics, staged = os.path.join(self.output_dir, "metrics.jsonl"), None
            try:
                if record is not None:
                    path = metrics
                    staged = stage_text(metrics, metrics_text(read_metrics(metrics) + [record]))
                for path in paths:
                    save_atomic(state, path)
                if staged is not None:
                    os.replace(staged, metrics)
            except (OSError, RuntimeError) as failure:  # no space left, no permission
                if staged is not None and os.path.exists(staged):
                    os.remove(staged)
                error = (f"could not write {path} ({one_line(failure)}): make room or fix the permissions in "
                         f"{self.output_dir}, then rerun with --resume auto; {self.kept()}")
        error = dist_utils.all_gather_object(error)[0]
        if error:
            raise UserError(error)
        self.saved = (epoch, step)


def _tensors(obj):
    """The tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
