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


def load_checkpoint(path, training=True):
    """Read a checkpoint written by :func:`save_atomic`; one clear error if it cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path given to --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
