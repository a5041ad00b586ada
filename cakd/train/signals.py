"""SIGTERM, wherever it lands, and a first Ctrl-C: the trainer saves and exits 0, its data-loader
workers ignore them. A second Ctrl-C stops at once.

A preemption (SLURM's time limit, ``scancel``, ``timeout``, ``kill``) may signal the launcher,
its process group, or every process of the job; Ctrl-C signals the terminal's whole foreground
group. The launcher (``cakd.train.launch``) forwards SIGTERM to the ranks once
:meth:`StopRequest.install` has run in them. Data-loader workers must outlive the checkpoint: they
ignore a SIGTERM from anyone but their trainer, which shuts them down, and every SIGINT.
"""
import contextlib
import os
import signal
import threading
import time

import torch
from torch import distributed as dist

from .distributed import is_dist
from .report import UserError, print_error

# set by the launcher once it has been told to stop: ranks it starts afterwards (a restart) stop too
STOP_ENV = "CAKD_STOP_REQUESTED"


class StopRequest:
    """Set by SIGTERM or a first SIGINT; the loop saves a checkpoint and exits at the next agreed
    iteration. ``reason`` names the first signal. A second SIGINT ends the process at once, with
    one line; a save it cuts short leaves a ``.tmp-*`` file that the next start removes."""

    def __init__(self):
        self.requested = False
        self.reason = "SIGTERM"
        self.interrupts = 0

    def install(self):
        self.requested = os.environ.get(STOP_ENV) == "1"
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts == 2:  # at once: a KeyboardInterrupt could land where Python ignores it (a __del__)
                print_error(UserError("stopped at once by a second Ctrl-C: the run folder keeps its last checkpoint "
                                      "(--resume auto goes on from it)"))
                os._exit(130)
        if not self.requested:
            self.reason = signal.Signals(signum).name
        self.requested = True


class StopCheck:
    """Where the ranks agree on a :class:`StopRequest`: after every step in one process (a flag
    read, no collective); under torchrun every ``k`` steps, one small all-reduce of the request
    and of the time since the last agreement (the slowest rank's). ``k`` is chosen at each
    agreement from that time so that the next comes about ``seconds`` later: a stop is acted on
    within a step or a few seconds of steps whatever ``--print-freq`` is, and a fast loop does not
    wait on the device every step. Every rank computes ``k`` from the same reduced numbers.
    ``clock``: seconds (tests give a fake one)."""

    def __init__(self, stop, device, seconds=2.0, clock=time.monotonic, most=1000):
        self.stop, self.device, self.seconds, self.clock, self.most = stop, device, seconds, clock, most
        self.every, self.steps, self.since = 1, 0, clock()

    def __call__(self):
        """Whether to stop after the step just taken (collective at agreements)."""
        if self.stop is None:
            return False
        if not is_dist():
            return self.stop.requested
        self.steps += 1
        if self.steps < self.every:
            return False
        t = torch.tensor([float(self.stop.requested), self.clock() - self.since], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        requested, elapsed = t.tolist()
        self.every = max(1, min(self.most, int(self.seconds * self.steps / elapsed) if elapsed > 0 else self.most))
        self.steps, self.since = 0, self.clock()
        return requested > 0


@contextlib.contextmanager
def sigterm_held():
    """Hold SIGTERM and SIGINT while data-loader workers are forked: they start with them blocked
    (see :func:`worker_init`) and this process gets any that came meanwhile on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if held - set(previous):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held - set(previous))


def worker_init(worker_id=None):
    """``worker_init_fn`` of every loader: SIGTERM from the trainer (``terminate()`` at shutdown)
    still ends the worker; from anyone else it is ignored, as SIGINT is, so the trainer can save first.

    torch's worker installs a handler that dies on any SIGTERM not sent by its parent; it runs
    before this, so SIGTERM is kept blocked and a thread takes it with its sender's pid instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the trainer decides
    if not hasattr(signal, "sigwaitinfo"):  # no sender pid here (macOS): ignore every SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()
