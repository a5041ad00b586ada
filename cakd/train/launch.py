"""``python -m cakd.train.launch [torchrun flags] -m cakd.train [flags]``: torchrun that survives SIGTERM.

torchrun turns a SIGTERM into an exception: it signals its workers, waits a grace period, kills
them and exits 1 with a traceback. Here torchrun is told to leave SIGTERM alone
(``--signals-to-handle``); the launcher forwards it to its workers (the ranks), which finish their
step, save and exit 0, so torchrun sees a successful run and the launcher exits 0. A rank that is
still starting gets it once its handler is in place, not before (it would die of it).

When a rank fails it has printed the run's one ``error:`` line (``cakd.train.report``); the
launcher exits with that rank's status, without torchrun's traceback and log lines.
"""
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from .signals import STOP_ENV

# what torchrun still handles itself (it kills its workers on these); SIGTERM and SIGINT are the launcher's
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"


def children(pid):
    """Process ids of ``pid``'s children (Linux: the parent field of /proc/*/stat; ``pgrep`` elsewhere)."""
    if not os.path.isdir("/proc"):
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command)": state, parent, ...
            if int(fields[1]) == pid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


def catches_sigterm(pid):
    """Whether process ``pid`` has its SIGTERM handler in place (Linux: SigCgt in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return not os.path.isdir("/proc")  # elsewhere: no way to tell, pass it on at once


def forward(signum):
    """Pass ``signum`` (SIGTERM, or a first Ctrl-C's SIGINT) on to each rank once it can take it:
    a rank still importing would die of it (and torchrun restart it). Ranks started from now on
    (a restart) see ``STOP_ENV``."""
    done = set()
    while True:
        for child in children(os.getpid()):
            if child not in done and catches_sigterm(child):  # its SIGINT handler is set with it
                try:
                    os.kill(child, signum)
                except ProcessLookupError:
                    pass
                done.add(child)
        time.sleep(0.2)


def on_sigterm(signum, frame):
    if os.environ.get(STOP_ENV) != "1":
        os.environ[STOP_ENV] = "1"
        # said here: rank 0, which says what it saved, may run on another node (this one's log would stay empty)
        print(f"{signal.Signals(signum).name} to the launcher on {socket.gethostname()}: passed on to this node's ranks, "
              "which save and stop", flush=True)
        threading.Thread(target=forward, args=(signum,), name="stop", daemon=True).start()


INTERRUPTS = []  # the Ctrl-Cs this launcher got


def on_sigint(signum, frame):
    """Ctrl-C reaches the launcher alone (torchrun starts each rank in a session of its own): the
    first is passed on as SIGTERM is, and each rank saves; the second is passed on at once, and
    each rank stops."""
    INTERRUPTS.append(signum)
    if len(INTERRUPTS) == 1:
        on_sigterm(signum, frame)
    elif len(INTERRUPTS) == 2:
        for child in children(os.getpid()):
            try:
                os.kill(child, signal.SIGINT)
            except ProcessLookupError:
                pass


def exit_code(error):
    """The status to exit with: a rank that exited with one (it said why) before a rank killed
    by a signal, and SIGTERM last (torchrun sends it to the others after the first failure)."""

    def order(item):
        rank, failure = item
        code = failure.exitcode
        return (0 if code > 0 else 1 if code != -signal.SIGTERM else 2, failure.timestamp, rank)

    failures = sorted(error.failures.items(), key=order)
    code = failures[0][1].exitcode if failures else 1
    return 128 - code if code < 0 else (code or 1)


def torchrun_lets_go_of_sigterm():
    return any("--signals-to-handle" in action.option_strings for action in torchrun.get_args_parser()._actions)


TRAINERS = {"cakd.train": "cakd.train.config", "cakd.detection": "cakd.detection.config"}  # -m MODULE: its flags' module


def trainer_help(argv):
    """``... -m cakd.train ... --help`` (or ``-m cakd.detection``): the trainer's help printed here,
    once, instead of by every rank torchrun would start (with the values this command line runs)."""
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv) or argv[argv.index("-m") + 1] not in TRAINERS:
        return False
    flags = argv[argv.index("-m") + 2 :]
    if "-h" not in flags and "--help" not in flags:
        return False
    importlib.import_module(TRAINERS[argv[argv.index("-m") + 1]]).print_help(flags)
    return True


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if trainer_help(argv):
        return 0
    if torchrun_lets_go_of_sigterm():
        argv = ["--signals-to-handle", TORCHRUN_SIGNALS, *argv]
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigint)
    else:
        print(
            "warning: this torch's torchrun has no --signals-to-handle: on SIGTERM it signals the ranks itself and "
            "kills those not done within its grace period, and the launcher exits 143",
            file=sys.stderr,
        )
    logging.disable(logging.ERROR)  # torchrun's failure reports would bury the rank's error line
    try:
        torchrun.main(argv)
    except ChildFailedError as error:
        return exit_code(error)
    except SignalException as error:  # SIGHUP, SIGQUIT (and SIGINT on an older torch): torchrun has stopped the ranks
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
