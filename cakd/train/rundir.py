"""The run folder (``--output-dir``) belongs to one run.

Rank 0 holds an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` while the run writes there: the
kernel releases it on any exit, a crash included, so it is never stale, and a second run into
the folder (a requeued job while the old one still runs) stops with one line naming the holder.
Under the lock no one else writes here, so the ``.tmp-*`` files of a save cut short are leftovers
to remove. A fresh start over a ``checkpoint.pth`` would overwrite it: it is refused unless
``--start-over`` asks for it, which moves the old run's files aside, never deletes them.
"""
import datetime
import fcntl
import glob
import os
import re
import socket

from .report import UserError

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoint.pth", "config.yaml", "metrics.jsonl", "dataset_cache.json", "tensorboard")


def lock(folder):
    """Take ``folder``'s lock; returns its file descriptor (closing it releases the lock)."""
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode(errors="replace").strip() or "a process that has not said who it is yet"
        os.close(fd)
        raise UserError(
            f"{folder} is in use by another run ({holder}): wait for it to end, or give this run another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}".encode(), 0)
    return fd


def remove_leftovers(folder):
    """Remove the temporary files of saves cut short (``.tmp-*``, ``*.tmp``) that this user owns."""
    for path in glob.glob(os.path.join(folder, ".tmp-*")) + glob.glob(os.path.join(folder, "*.tmp")):
        if os.path.isfile(path) and not os.path.islink(path) and os.stat(path).st_uid == os.getuid():
            os.remove(path)


def move_aside(folder):
    """The previous run's files into ``folder/previous-<time>/``; returns that folder, or None
    when there was nothing to move."""
    names = sorted(name for name in os.listdir(folder) if name in RUN_FILES or re.fullmatch(r"model_\d+\.pth", name))
    if not names:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = os.path.join(folder, f"previous-{stamp}"), 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(folder, f"previous-{stamp}-{n}")
    os.makedirs(aside)
    for name in names:
        os.rename(os.path.join(folder, name), os.path.join(aside, name))
    return aside


def claim(args):
    """Lock ``args.output_dir`` for this run, clean it and check that this start may write there.

    Returns ``(lock fd, folder the old run was moved to or None)``. Raises :class:`UserError`
    (the lock released) for a folder another run holds, ``--start-over`` with a ``--resume``
    path, and a fresh start over a ``checkpoint.pth``."""
    folder = args.output_dir
    if args.start_over and args.resume not in ("", "auto"):
        raise UserError(f"--start-over starts a new run, --resume {args.resume} goes on with one: pass one of them")
    os.makedirs(folder, exist_ok=True)
    fd = lock(folder)
    try:
        remove_leftovers(folder)
        aside = move_aside(folder) if args.start_over else None
        checkpoint = os.path.join(folder, "checkpoint.pth")
        if not args.resume and os.path.isfile(checkpoint):
            raise UserError(
                f"{checkpoint} exists and this run starts fresh: resume it with --resume auto, give this run another "
                "--output-dir, or pass --start-over to move that run's files aside into a previous-<time>/ folder"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, aside
