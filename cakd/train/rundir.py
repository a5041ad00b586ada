"""The run folder (``--output-dir``) belongs to one run, and a run that cannot start leaves it as it was.

Rank 0 holds an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` while the run writes there: the
kernel releases it on any exit, a crash included, so it is never stale, and a second run into
the folder (a requeued job while the old one still runs) stops with one line naming the holder.
The lock is taken before the run's checks (data, teacher file, crop, resume), so that second run
is told at once; nothing else is written until they pass (:meth:`RunFolder.start`), and a start
that fails removes the lock file it made (or puts back the holder line it replaced). Under the
lock no one else writes here, so the ``.tmp-*`` files of a save cut short (the names
:func:`cakd.weights._replacing` gives) are leftovers to remove. A fresh start over a
``checkpoint.pth`` would overwrite it: it is refused unless ``--start-over`` asks for it, which
moves the old run's files aside, never deletes them.
"""
import datetime
import fcntl
import glob
import os
import re
import socket

from . import distributed as dist_utils
from .report import UserError, one_line

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoint.pth", "config.yaml", "metrics.jsonl", "dataset_cache.json", "tensorboard")
LEFTOVER = re.compile(r"\.tmp-[a-z0-9_]{8}\.(pth|txt)")  # tempfile.mkstemp(prefix=".tmp-", suffix=...) in cakd.weights


class Lock:
    """``folder``'s lock, held: :meth:`release` lets it go."""

    def __init__(self, folder):
        path = os.path.join(folder, LOCK_FILE)
        while True:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # removed in between by a start that failed: again
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode(errors="replace").strip() or "a process that has not said who it is yet"
                os.close(fd)
                raise UserError(
                    f"{folder} is in use by another run ({holder}): wait for it to end, or give this run another --output-dir"
                ) from None
            # a failed start removes the lock file it made while holding it: a lock taken on that
            # file after it was removed guards nothing, so take the one at the path again
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd, self.path, self.created = fd, path, created
        self.previous = os.pread(fd, 300, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}".encode(), 0)

    def release(self, leave_as_found=False):
        """Let the lock go; ``leave_as_found``: a start that failed removes the lock file it made,
        or puts back the line of the run before (while still holding it, so no run sees a half)."""
        if leave_as_found:
            if self.created:
                os.remove(self.path)
            else:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, self.previous, 0)
        os.close(self.fd)


def remove_leftovers(folder):
    """Remove the temporary files of saves cut short (``.tmp-*.pth``, ``.tmp-*.txt``: only the
    names the atomic writer gives) that this user owns."""
    for path in glob.glob(os.path.join(folder, ".tmp-*")):
        if LEFTOVER.fullmatch(os.path.basename(path)) and os.path.isfile(path) and not os.path.islink(path) \
                and os.stat(path).st_uid == os.getuid():
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


class RunFolder:
    """``args.output_dir`` for this run (rank 0): :meth:`claim` before the run's checks, which
    writes nothing but the lock of a folder that exists; :meth:`start` once they passed, which
    may write; :meth:`release` at the end."""

    def __init__(self, args):
        self.folder = args.output_dir
        self.lock = None
        self.started = False

    def claim(self, args):
        """Refuse, before the run's checks, what the folder or the flags already say cannot run:
        another run holds it, ``--start-over`` with a ``--resume`` path, a fresh start over a
        ``checkpoint.pth``. Locks the folder if it exists (a missing one is made by :meth:`start`)."""
        if args.start_over and args.resume not in ("", "auto"):
            raise UserError(f"--start-over starts a new run, --resume {args.resume} goes on with one: pass one of them")
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise UserError(f"--output-dir {self.folder} is a file, not a folder: give this run a folder")
        if os.path.isdir(self.folder):
            self.lock = Lock(self.folder)
            try:
                self.refuse_fresh_start_over_a_run(args.resume, args.start_over)
            except BaseException:
                self.release()
                raise

    def refuse_fresh_start_over_a_run(self, resume, start_over):
        checkpoint = os.path.join(self.folder, "checkpoint.pth")
        if not resume and not start_over and os.path.isfile(checkpoint):
            raise UserError(
                f"{checkpoint} exists and this run starts fresh: resume it with --resume auto, give this run another "
                "--output-dir, or pass --start-over to move that run's files aside into a previous-<time>/ folder"
            )

    def start(self, args):
        """The run's checks passed: make and lock the folder if :meth:`claim` found none, remove
        the leftovers of saves cut short, move a previous run aside (``--start-over``). Returns the
        folder it went to, or None. From here on the run writes in the folder."""
        if self.lock is None:
            os.makedirs(self.folder, exist_ok=True)
            self.lock = Lock(self.folder)
            try:  # made or filled by another run since claim() looked
                self.refuse_fresh_start_over_a_run(args.resume, args.start_over)
            except BaseException:
                self.release()
                raise
        self.started = True
        remove_leftovers(self.folder)
        return move_aside(self.folder) if args.start_over else None

    def release(self):
        """Let the lock go; before :meth:`start`, the folder is left as it was found."""
        if self.lock is not None:
            self.lock.release(leave_as_found=not self.started)
            self.lock = None


def on_output_dir(args, step):
    """Rank 0 does ``step(args)`` on the run folder (:class:`rundir.RunFolder`; None: nothing, as on
    the other ranks) and returns what it returns there; every rank raises the same refusal."""
    result = error = None
    if step is not None:
        try:
            result = step(args)
        except UserError as refusal:
            error = str(refusal)
        except OSError as failure:
            error = f"cannot use --output-dir {args.output_dir} ({one_line(failure)}): pick a folder this user can write"
    error = dist_utils.all_gather_object(error)[0]
    if error:
        raise UserError(error)
    return result
