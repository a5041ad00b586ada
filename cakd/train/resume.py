"""What a resume may change: the flags a checkpoint's run is resumed with are checked against
the ones it saved (the checkpoint itself is read and loaded by :mod:`checkpoints`)."""

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
