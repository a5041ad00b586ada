"""The resume policy, for every trainer: which checkpoint ``--resume auto`` means, and what a
resume may change (the flags a checkpoint's run is resumed with are checked against the ones it
saved, before anything is written). The checkpoint itself is read and loaded by :mod:`checkpoints`."""
import os

from . import distributed as dist_utils
from .checkpoints import read
from .report import UserError
from .logging import print_main


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


def resume_path(args):
    """``--resume auto``: OUTPUT_DIR/checkpoint.pth when rank 0 sees it, else a fresh start."""
    if args.resume != "auto":
        return args.resume
    if args.start_over:  # the run that is there goes aside (RunFolder.start)
        return ""
    path = os.path.join(args.output_dir or ".", "checkpoint.pth")
    found = dist_utils.all_gather_object(os.path.isfile(path))[0]  # every rank takes rank 0's answer
    if found:
        return path
    if args.test_only:
        raise UserError(f"--resume auto: there is no {path} to evaluate")
    print_main(f"--resume auto: no {path} yet, starting fresh")
    return ""


def check_resume(args, released=None):
    """Refuse, before anything is written, a resume whose flags would change the training it
    resumes (:func:`refused_change`): what a run records is what it runs. ``released``: as for
    :func:`refused_change` (a recipe's values of its distiller options)."""
    checkpoint = read(args.resume, mmap=True)
    step = checkpoint.get("step")
    change = refused_change(checkpoint["args"], args, step is not None, released)
    if change is None:
        return
    name, was, now = change
    flag = "the process count (torchrun --nproc_per_node x --nnodes)" if name == "world_size" else "--" + name.replace("_", "-")
    if name in EPOCH_END_ONLY:
        raise UserError(
            f"{args.resume} was saved mid-epoch (step {step}) with {flag} {was}, not {now}: resume it with {flag} {was} "
            "(it may change when a run resumes from an epoch's end)"
        )
    raise UserError(
        f"{args.resume} was trained with {flag} {was}, not {now}: a resume goes on with the flags of the run it resumes; "
        f"resume with {flag} {was} (the run's config.yaml holds them all), or start a new run in another --output-dir"
    )
