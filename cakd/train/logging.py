"""Progress lines (as the released MetricLogger prints them) and TensorBoard scalars.

Loss values stay on the device between prints: the meters keep detached tensors and
read them back once per ``print_freq`` iterations, so logging adds no per-step sync.
"""
import datetime
import time
from collections import defaultdict, deque

import torch

from .distributed import all_reduce_sum, is_main_process


class TensorMeter:
    """Window and global average of a scalar that may live on the GPU."""

    def __init__(self, window=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.pending = []  # device tensors not yet read back
        self.window = deque(maxlen=window)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        if isinstance(value, torch.Tensor):
            self.pending.append((value.detach(), n))
        else:
            self._add(float(value), n)

    def _add(self, value, n):
        self.window.append(value)
        self.total += value * n
        self.count += n

    def flush(self):
        if self.pending:
            values = torch.stack([v.float() for v, _ in self.pending]).cpu().tolist()  # one sync
            for value, (_, n) in zip(values, self.pending):
                self._add(value, n)
            self.pending.clear()

    @property
    def median(self):
        self.flush()
        return float(torch.tensor(list(self.window)).median()) if self.window else float("nan")

    @property
    def avg(self):
        self.flush()
        return sum(self.window) / len(self.window) if self.window else float("nan")

    @property
    def global_avg(self):
        self.flush()
        return self.total / self.count if self.count else float("nan")

    @property
    def last(self):
        self.flush()
        return self.window[-1] if self.window else float("nan")

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.last)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = defaultdict(TensorMeter)
        self.delimiter = delimiter

    def update(self, n=1, **values):
        for name, value in values.items():
            self.meters[name].update(value, n)

    def global_averages(self, names, device):
        """Global averages of ``names`` over every rank: sums and counts are reduced, so each
        image weighs the same whichever rank saw it."""
        meters = [self.meters[name] for name in names]
        for meter in meters:
            meter.flush()
        sums = torch.tensor([m.total for m in meters] + [m.count for m in meters], dtype=torch.float64, device=device)
        sums = all_reduce_sum(sums).tolist()
        n = len(meters)
        return {name: sums[i] / sums[n + i] if sums[n + i] else float("nan") for i, name in enumerate(names)}

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header="", total=None, start=0):
        """Yield ``(i, item)``; every ``print_freq`` iterations print a progress line with
        ETA, iteration and data time."""
        total = total if total is not None else len(iterable)
        iter_time, data_time = TensorMeter(fmt="{avg:.4f}"), TensorMeter(fmt="{avg:.4f}")
        width = len(str(total))
        start_time = end = time.time()
        i = start
        for item in iterable:
            data_time.update(time.time() - end)
            yield i, item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                line = self.delimiter.join(
                    [
                        f"{header} [{i:>{width}}/{total}]",
                        f"eta: {eta}",
                        str(self),
                        f"time: {iter_time}",
                        f"data: {data_time}",
                    ]
                )
                if torch.cuda.is_available():
                    line += f"{self.delimiter}max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB"
                print_main(line)
            i += 1
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        print_main(f"{header} Total time: {elapsed} ({(time.time() - start_time) / max(i - start, 1):.4f} s / it)")


def print_main(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


@torch.no_grad()
def topk_correct(logits, targets, topk=(1, 5)):
    """Per k, how many samples have their label among the top-k logits (soft MixUp/CutMix
    targets count by their largest class), as one device tensor."""
    if targets.ndim == 2:
        targets = targets.argmax(dim=1)
    k = min(max(topk), logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
    return torch.stack([hits[:, :kk].any(dim=1).sum() for kk in topk])


class Accuracy:
    """Top-k correct counts summed on the device and reduced across ranks once."""

    def __init__(self, device, topk=(1, 5)):
        self.topk = topk
        self.correct = torch.zeros(len(topk), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    def update(self, logits, targets):
        self.correct += topk_correct(logits, targets, self.topk)
        self.count += targets.shape[0]

    def compute(self):
        """Percentages over all ranks: exact counts, not an average of averages."""
        totals = all_reduce_sum(torch.cat([self.correct, self.count[None]]))
        count = max(totals[-1].item(), 1.0)
        return [100.0 * c / count for c in totals[:-1].tolist()], int(totals[-1].item())


class TensorBoard:
    """A SummaryWriter on rank 0 only (``log_dir``; None elsewhere), a no-op elsewhere. It is made
    at the first value: a run that stops before training writes no ``tensorboard/``."""

    def __init__(self, log_dir):
        self.log_dir = log_dir if is_main_process() and log_dir else None
        self.writer = None

    def _writer(self):
        if self.writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        return self.writer

    def scalars(self, values: dict, step: int, prefix=""):
        if self._writer() is not None:
            for name, value in values.items():
                self.writer.add_scalar(prefix + name, value, step)

    def image(self, tag, image, step):
        """A (3, H, W) uint8 image."""
        if self._writer() is not None:
            self.writer.add_image(tag, image, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
