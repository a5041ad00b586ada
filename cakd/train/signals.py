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

from .distributed import host_any
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
    """Where the ranks agree on a :class:`StopRequest`: after every training step or evaluation
    batch. In one process it reads the flag; under torchrun it is one all-reduce of the flag on
    the host (:func:`distributed.host_any`, a gloo group beside NCCL's), which waits for no GPU
    work. A stop is acted on at the next step, whatever ``--print-freq`` is."""

    def __init__(self, stop):
        self.stop = stop

    def __call__(self):
        """Whether to stop after the step just taken (a collective under torchrun)."""
        return self.stop is not None and host_any(self.stop.requested)


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
