"""``metrics.jsonl``: one JSON object per evaluated epoch, the file a run folder's readers
(``scripts/summarize.py``, a resume) share. Written whole, through a temporary file and a
rename, so a full disk never leaves a line cut short; read tolerating the cut last line that an
earlier version's in-place append could leave."""
import json
import os

from ..weights import write_text_atomic
from .report import UserError, one_line
from .logging import print_main


def metrics_record(epoch, results, train_stats):
    """An epoch's ``metrics.jsonl`` line, as a dict."""
    return {"epoch": epoch, **results, **{f"train_{k}": v for k, v in train_stats.items()}}


def read_metrics(path):
    """The records of ``metrics.jsonl`` (none if it is not there). A last line cut short (a full
    disk under a version that appended in place) is left out with a note; any other line that is
    not a JSON object with an ``epoch`` is one error line."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an object with an integer epoch")
        except ValueError as error:
            if number == len(lines) and not line.endswith("\n"):
                print_main(f"note: {path}: its last line was cut short ({one_line(error)}): left out")
                continue
            raise UserError(f"{path} line {number} is not a metrics record ({one_line(error)}): fix or remove that line") from None
        records.append(record)
    return records


def metrics_text(records):
    return "".join(json.dumps(record) + "\n" for record in records)


def drop_metrics_from(path, epoch):
    """On resume, forget the lines of the epochs about to be trained again."""
    if os.path.isfile(path):
        write_text_atomic(path, metrics_text([r for r in read_metrics(path) if r["epoch"] < epoch]))


def append_metrics(path, record):
    """Add ``record`` to ``metrics.jsonl``, the file replaced whole (never a cut line)."""
    try:
        write_text_atomic(path, metrics_text(read_metrics(path) + [record]))
    except OSError as failure:
        raise UserError(f"could not write {path} ({one_line(failure)}): make room or fix the permissions, then rerun "
                        "with --resume auto (the epoch's checkpoint still says it is to be evaluated)") from None
