"""``python tests/held_train.py FLAGS``: the trainer (``$HOLD_TRAINER``: ``cakd.train``, the default,
or ``cakd.detection``), held after the progress line that holds
``$HOLD_AFTER`` until the file ``$HOLD_RELEASE`` exists, so that a test signals it at a known
point instead of racing a live run (which may have finished its epoch, or merged two Ctrl-Cs
into one, by the time the signal lands).

While held it says, on a line of its own, each new state of the trainer's stop request
(``held: requested R, interrupts N``): once its signal handler has run, not merely once the
signal was sent.
"""
import importlib
import os
import signal
import sys
import time

from cakd.train import logging as progress

AFTER, RELEASE = os.environ["HOLD_AFTER"], os.environ["HOLD_RELEASE"]
print_main = progress.print_main


def held():
    stop = signal.getsignal(signal.SIGINT).__self__  # the trainer's StopRequest
    said = None
    while not os.path.exists(RELEASE):
        state = (stop.requested, stop.interrupts)
        if state != said:
            print_main(f"held: requested {state[0]}, interrupts {state[1]}")
            said = state
        time.sleep(0.01)  # a signal interrupts the sleep: its handler runs here


def print_then_hold(*args, **kwargs):
    print_main(*args, **kwargs)
    if AFTER in " ".join(map(str, args)) and not os.path.exists(RELEASE):
        held()


progress.print_main = print_then_hold  # MetricLogger.log_every looks it up when it prints
if __name__ == "__main__":
    trainer = {"cakd.train": "cakd.train.trainer", "cakd.detection": "cakd.detection.trainer"}[os.environ.get("HOLD_TRAINER", "cakd.train")]
    sys.exit(importlib.import_module(trainer).main())
