"""A training process's life, the same for ``python -m cakd.train`` and ``python -m cakd.detection``:
the stop request first (from then on a SIGTERM saves), the device and torchrun's process group,
the run folder held while the run lasts, and the one catch that turns what went wrong into one
line (a peer's failure into none, or into "another process of this run is gone")."""
import contextlib
import os
import signal
import sys

import torch

from . import distributed as dist_utils
from .report import UserError, first_to_report, one_line, print_error, run_and_report
from .logging import print_main
from .rundir import RunFolder, on_output_dir
from .signals import StopRequest


def start(args):
    """Install the stop request (with ``--test-only`` a SIGTERM just ends the process: nothing to
    save; a handler, so the launcher passes it on), check ``--device`` and join torchrun's process
    group. Writes ``distributed, rank, world_size, device`` onto ``args``: ``config.yaml`` and the
    checkpoint keep them, and a resume checks the process count. Returns the :class:`StopRequest`."""
    stop = StopRequest()
    if args.test_only:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    else:
        stop.install()  # first: from now on a SIGTERM or a first Ctrl-C saves
    dist_utils.check_device(args.device)
    found = dist_utils.init_distributed_mode(args.device, args.dist_url)
    args.distributed, args.rank, args.world_size, args.device = found.distributed, found.rank, found.world_size, str(found.device)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts:
        print_main(f"torchrun restart {restarts} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}")
    return stop


@contextlib.contextmanager
def run_folder(args):
    """Rank 0 claims ``--output-dir`` (:class:`rundir.RunFolder`) for the run's length and lets
    it go at the end; yields it (None on the other ranks, with ``--test-only`` or without a folder).
    The run calls :meth:`~rundir.RunFolder.start` (through :func:`rundir.on_output_dir`) once its
    checks pass: nothing is written before."""
    folder = RunFolder(args) if args.output_dir and not args.test_only and dist_utils.is_main_process() else None
    try:
        on_output_dir(args, folder and folder.claim)
        yield folder
    finally:
        if folder is not None:
            folder.release()


def main(train, args):
    """``train(args)`` with the one catch (:func:`report.run_and_report`): exit status 0, or 1
    after one ``error:`` line; 130 after a second Ctrl-C. The signal handlers ``train`` installs
    are put back, and the process group is left."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # train() takes them over
    try:
        return run_and_report(train, args)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves), or one where nothing is saved
        print_error(UserError(f"stopped by Ctrl-C: nothing saved since the last checkpoint in {args.output_dir or 'no folder'}"))
        return 130
    except Exception as error:  # not bad input: a bug, or a collective failing because a peer left
        if not dist_utils.is_dist() and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise
        if not first_to_report():  # a peer failed first and said why; this is the echo
            return 1
        if lost_a_peer(error):
            print(f"error: another process of this run is gone ({one_line(error)})", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        dist_utils.cleanup()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def lost_a_peer(error):
    """Whether ``error`` is a collective failing because another rank left (gloo, NCCL, the store)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        needle in text for needle in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL")
    )
