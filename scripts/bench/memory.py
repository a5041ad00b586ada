"""Peak memory of each mode alone: CUDA max allocated on a GPU; the process's peak resident
set size on the CPU, reset between modes through /proc/self/clear_refs."""
import ctypes
import gc
import time

import torch

from .modes import AMP_DTYPES, build_mode


def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next peak is this mode's
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_of_mode(mode, student, teacher, images, targets, args, device, memory_format):
    """Peak memory of one mode alone (build it, run ``--warmup`` steps, tear it down), and the
    time of its first step (with ``--compile``: the compilation)."""
    amp_dtype = AMP_DTYPES[args.dtype]
    reset_peak_memory(device)
    step, cleanup = build_mode(mode, student, teacher, args, device, memory_format)
    first = None
    for _ in range(max(args.warmup, 1)):
        start = time.perf_counter()
        loss = step(images, targets, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = first or time.perf_counter() - start
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"{mode}: non-finite loss")
    peak = peak_memory_mib(device)
    cleanup()
    return peak, first
