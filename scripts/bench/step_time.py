"""Step times: every mode built at once, one step of each in turn (the order rotating every
round), after ``--warmup`` rounds, so drifts of the machine fall on every mode alike."""
import time

import torch

from .modes import AMP_DTYPES, build_mode


def time_modes(student, teacher, images, targets, args, device, memory_format):
    """Median step time of every mode, all built at once and stepped in turn (a rotated order
    each round), so drifts of the machine fall on every mode alike."""
    amp_dtype = AMP_DTYPES[args.dtype]
    steps = {mode: build_mode(mode, student, teacher, args, device, memory_format) for mode in args.modes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {mode: [] for mode in args.modes}
    modes = list(args.modes)
    for r in range(args.warmup + args.steps):
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            sync()
            start = time.perf_counter()
            steps[mode][0](images, targets, amp_dtype)
            sync()
            if r >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    for _, cleanup in steps.values():
        cleanup()
    return times
