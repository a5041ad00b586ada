"""Bad input ends with one line: what is wrong and what to do, on stderr, exit status 1."""
import re
import sys


class UserError(Exception):
    """Bad input: printed as one line, exit status 1."""


def one_line(error):
    """The last line of an error's message, without the ``module.Class: `` prefix that a
    DataLoader worker's re-raised traceback puts there."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def print_error(error, args):
    """``error: <one line>`` on stderr, prefixed with the rank when several processes run."""
    prefix = f"[rank {getattr(args, 'rank', 0)}] " if getattr(args, "world_size", 1) > 1 else ""
    print(f"{prefix}error: {one_line(error)}", file=sys.stderr, flush=True)
