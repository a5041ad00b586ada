"""SIGTERM, wherever it lands: the trainer saves and exits 0, its data-loader workers ignore it.

A preemption (SLURM's time limit, ``scancel``, ``timeout``, ``kill``) may signal the launcher,
its process group, or every process of the job. The launcher (``cakd.train.launch``) forwards it
to the ranks once :meth:`StopRequest.install` has run in them. Data-loader workers must outlive
the checkpoint: they ignore a SIGTERM from anyone but their trainer, which shuts them down.
"""
import contextlib
import os
import signal
import threading

# set by the launcher once it has been told to stop: ranks it starts afterwards (a restart) stop too
STOP_ENV = "CAKD_STOP_REQUESTED"


class StopRequest:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next agreed iteration."""

    def __init__(self):
        self.requested = False

    def install(self):
        self.requested = os.environ.get(STOP_ENV) == "1"
        signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True


@contextlib.contextmanager
def sigterm_held():
    """Hold SIGTERM while data-loader workers are forked: they start with it blocked (see
    :func:`worker_init`) and this process gets any SIGTERM that came meanwhile on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        if signal.SIGTERM not in previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def worker_init(worker_id=None):
    """``worker_init_fn`` of every loader: SIGTERM from the trainer (``terminate()`` at shutdown)
    still ends the worker; from anyone else it is ignored, so the trainer can save first.

    torch's worker installs a handler that dies on any SIGTERM not sent by its parent; it runs
    before this, so SIGTERM is kept blocked and a thread takes it with its sender's pid instead.
    """
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
