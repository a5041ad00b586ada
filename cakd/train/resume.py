"""Reading a training checkpoint back, and the RNG states that make a resume exact."""
import os
import pickle
import random

import numpy as np
import torch

from ..checkpoint import load_error


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of another kind; the message says what to do."""


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


TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "args")


def load_checkpoint(path, training=True, mmap=False):
    """Read a checkpoint written by :func:`save_atomic`; one clear error if it cannot be used.
    ``mmap``: map the file instead of reading it (its args alone cost nothing)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path given to --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, pickle garbage, wrong format, a crafted pickle
        what = "it is not a checkpoint cakd wrote" if isinstance(error, pickle.UnpicklingError) else "it is corrupt or truncated"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({load_error(error)}): {what}; "
            "resume from an earlier model_<epoch>.pth in the same folder"
        ) from None
    missing = [key for key in TRAINING_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else TRAINING_KEYS
    if training and missing:
        raise CheckpointError(f"{path} is not a cakd training checkpoint (no {', '.join(missing)})")
    return checkpoint


def finished(path):
    """Whether the run that wrote ``path`` trained its last epoch to the end (not stopped
    mid-way by a SIGTERM or a crash). Reads the file memory-mapped: no tensor is loaded."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError):
        return False
    return checkpoint.get("step") is None and checkpoint["epoch"] + 1 >= checkpoint["args"]["epochs"]


# What a resume may change (the README lists it). Free: how the run is executed, kept or
# evaluated, not what it trains; --epochs too, except under the cosine schedule (its length is in
# the checkpoint's scheduler state). At an epoch's end only: the process count and the batch,
# whose product a mid-epoch position counts batches of. Every other flag is refused when it differs.
FREE_ON_RESUME = (
    "device", "workers", "print_freq", "output_dir", "checkpoint_freq", "dist_url", "channels_last", "compile",
    "use_deterministic_algorithms", "data_path", "cache_dataset", "download", "eval_views", "eval_views_protocol", "val_resize_size",
    "val_crop_size", "max_loss_growth",
)
EPOCH_END_ONLY = ("world_size", "batch_size")


def refused_change(saved, args, mid_epoch, released=None):
    """The first flag whose value differs from the checkpoint's ``saved`` args and may not change:
    ``(name, saved value, value now)``, or None. ``released``: the recipe's values of the
    distiller options, which a saved or given None stands for."""
    released = released or {}
    names = [n for n in ("recipe", "model", "teacher") if n in saved] + sorted(set(saved) - {"recipe", "model", "teacher"})
    for name in names:
        if name in FREE_ON_RESUME or not hasattr(args, name):
            continue
        was, now = saved[name], getattr(args, name)
        if name in released:
            was, now = (released[name] if was is None else was), (released[name] if now is None else now)
        if was == now or (name in EPOCH_END_ONLY and not mid_epoch):
            continue
        if name == "epochs" and saved.get("lr_scheduler") != "cosineannealinglr":
            continue
        return name, was, now
    return None
