"""The reporting convention: bad input ends with one line, what is wrong and what to do, on
stderr, exit status 1 (:func:`run_and_report`, around the trainer and every script).

Under torchrun the line is said once per run, not once per rank: the first process to fail
claims it in the agent's store (``first_to_report``); the others exit quietly with the same status.
"""
import datetime
import os
import re
import sys

from ..errors import CakdError


class UserError(CakdError):
    """Bad input: printed as one line, exit status 1."""


def one_line(error):
    """The last line of an error's message, without the ``module.Class: `` prefix that a
    DataLoader worker's re-raised traceback puts there."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def _agent_store():
    """A client of torchrun's own store (MASTER_ADDR:MASTER_PORT), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import TCPStore

    return TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=datetime.timedelta(seconds=10)
    )


def _report_key():
    # one count per torchrun attempt: a restarted run reports its own failure again
    return f"cakd/reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def first_to_report():
    """True in the first process of this run (attempt) to ask: the one that prints the error."""
    try:
        store = _agent_store()
        return store is None or store.add(_report_key(), 1) == 1
    except Exception:  # no store to ask: every process speaks for itself
        return True


def print_error(error):
    """``error: <one line>`` on stderr, by the first process of the run to fail."""
    if first_to_report():
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)


def run_and_report(body, args):
    """Call ``body(args)``: exit status 0, or 1 after one ``error:`` line for a
    :class:`~cakd.errors.CakdError`. The one catch of the trainer and of every script."""
    try:
        body(args)
        return 0
    except CakdError as error:
        print_error(error)
        return 1
