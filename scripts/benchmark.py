"""Time distillation steps against the ideal: one student training step plus one teacher
forward pass, on the same student, teacher and batch, in one process.

    python scripts/benchmark.py --device cpu --batch-size 8                 # the CPU table of the README
    python scripts/benchmark.py --device cuda --batch-size 64 --dtype bf16 --channels-last
    python scripts/benchmark.py --loader-workers 0 1 2 --data-path /data/imagenet   # loader throughput

Peak memory is measured for each mode alone (CUDA max allocated on a GPU; process peak RSS
on the CPU, reset between modes through /proc/self/clear_refs). Step times are measured with
every mode built at once, one step of each in turn (the order rotating every round), after
``--warmup`` rounds: machine drifts fall on every mode alike. The table gives the median step
time, img/s, peak memory and each mode's ratio to the ideal.
``released_style`` reproduces what made the released step slow: the teacher under autograd with
its targets attached, so every step also back-propagates through the ViT. ``cakd_plain`` (asked
for by ``--modes``) is the cakd step with its switchable speed paths off, for an A/B in one
process (``--epoch 0`` for the lambda = 0 path).

``--profile`` adds, for the (eager) cakd step, the time of each part it adds to the ideal, from the
``torch.profiler`` ranges the method code opens (``cakd.attention_projector``, ...): the ops run
inside a range, plus their backward (matched by autograd sequence number), plus the optimizer
steps of the discriminator and of the projectors (stepped by their own SGD here, the same update
as one SGD over student and projectors). CPU time on the CPU, kernel time on a GPU.

``--flops`` adds each mode's floating-point operations per step (counted on an eager step) and
their ratio to the ideal's: the arithmetic a mode asks for, which its time ratio settles near on
a device bound by arithmetic.
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import cakd
from cakd.distillers import CAKDDistiller
from cakd.train.config import HelpFormatter
from cakd.train.data import ClassificationPresetTrain, ImageFolder
from cakd.train.engine import autocast, training_step
from cakd.train.scriptkit import DEFAULTS, add_shared_flags
from make_image_folder import make_image_folder  # beside this script

MODES = ("ideal", "baseline", "logits", "cakd", "released_style")
PLAIN = {"map_fold": "never", "zero_lambda_no_grad": False}  # cakd_plain: the switchable speed paths off
PARTS = (  # (profiler range, row of the --profile table)
    ("cakd.attention_projector", "attention projector and its maps"),
    ("cakd.groupwise_projector", "group-wise projector"),
    ("cakd.token_projector", "token projector"),
    ("cakd.teacher_maps", "teacher map recomputation"),
    ("cakd.discriminator", "discriminator forward/backward"),
    ("Optimizer.step#DiscriminatorSGD.step", "discriminator optimizer"),
    ("cakd.loss_terms", "loss terms"),
    ("Optimizer.step#ProjectorSGD.step", "optimizer of the projectors"),
)


class DiscriminatorSGD(torch.optim.SGD):
    """SGD under its own name in the profile (``Optimizer.step#DiscriminatorSGD.step``)."""


class ProjectorSGD(torch.optim.SGD):
    """SGD under its own name in the profile (``Optimizer.step#ProjectorSGD.step``)."""


class StudentAndProjectorSGD:
    """One SGD for the student's parameters, one for the projectors': per parameter the same
    update as a single SGD over both, so that the profile can time the projectors' share."""

    def __init__(self, trainable, **kwargs):
        self.optimizers = [torch.optim.SGD(trainable.student.parameters(), **kwargs),
                           ProjectorSGD(trainable.projector_parameters(), **kwargs)]
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()


class ReleasedStyleCAKD(CAKDDistiller):
    """The released step's cost: the teacher runs with autograd on and its targets stay attached
    (the numbers are the same, the backward pass also goes through the ViT)."""

    def run_teacher(self, images):
        self._teacher.requires_grad_(True)
        return self._teacher_taps(images)


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help, the description as written."""


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=Formatter)
    add_shared_flags(
        p, "device", "model", "teacher", "data_path",
        model=f"the student to time (default: {DEFAULTS['model']})", teacher=f"the teacher, random weights (default: {DEFAULTS['teacher']})",
        data_path="ImageFolder root (with train/) for the loader measurement (default: generated JPEGs)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="input resolution")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of both networks")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (with its projectors) and the teacher")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=[*MODES, "cakd_plain"],
                   help="none: only the loader measurement; cakd_plain (only when named): cakd with " + ", ".join(f"{k}={v}" for k, v in PLAIN.items()))
    p.add_argument("--epoch", type=int, default=40, help="epoch of the distillation steps (cakd: lambda is 0 before epoch 26)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    p.add_argument("--profile", action="store_true", help="also profile the cakd step: the time of each part beyond the ideal")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled cakd steps (after --warmup untimed ones)")
    p.add_argument("--flops", action="store_true", help="also count each mode's floating-point operations per step (eager)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[], help="also measure loader throughput for these worker counts")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed per worker count")
    return p


def get_args(argv=None):
    args = get_args_parser().parse_args(argv)
    args.model, args.teacher = args.model or DEFAULTS["model"], args.teacher or DEFAULTS["teacher"]
    return args


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def ideal_step(student, teacher, optimizer, images, targets, amp_dtype):
    """One plain student step (CE, backward, SGD) and one teacher forward in inference mode."""
    with autocast(amp_dtype, images.device.type):
        with torch.inference_mode():
            teacher(images)
        loss = F.cross_entropy(student(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def build_mode(mode, student, teacher, args, device, memory_format, split_optimizer=False):
    """Returns a step function for ``mode`` and a cleanup function; ``split_optimizer``: the
    projectors get their own SGD (for the profile)."""
    student = copy.deepcopy(student)
    if mode == "ideal":
        student.to(device, memory_format=memory_format)
        teacher_run = torch.compile(teacher) if args.compile else teacher
        student_run = torch.compile(student) if args.compile else student
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
        return (lambda images, targets, amp_dtype: ideal_step(student_run, teacher_run, optimizer, images, targets, amp_dtype)), (
            lambda: None
        )
    recipe = "cakd" if mode in ("released_style", "cakd_plain") else mode
    distiller = cakd.build_distiller(recipe, student, teacher, **(PLAIN if mode == "cakd_plain" else {}))
    if mode == "released_style":
        distiller.__class__ = ReleasedStyleCAKD  # same modules and numbers, the released cost
    distiller.to(device, memory_format=memory_format)
    distiller.train()
    if args.compile:
        distiller.compile()
    if split_optimizer:
        optimizer = StudentAndProjectorSGD(distiller.trainable, lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=1e-3, momentum=0.9)
    disc_optimizer = None
    if distiller.discriminator is not None:
        disc_optimizer = DiscriminatorSGD(distiller.discriminator.parameters(), lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "fp16" else None

    def step(images, targets, amp_dtype):
        return training_step(distiller, images, targets, args.epoch, optimizer, disc_optimizer, scaler, amp_dtype=amp_dtype)["total"]

    def cleanup():
        distiller.close()
        teacher.requires_grad_(False)

    return step, cleanup


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


def eager(args):
    """``args`` with ``--compile`` off."""
    return argparse.Namespace(**{**vars(args), "compile": False})


def part_times(events, device_time):
    """Microseconds per part over ``events``: the ops inside each range of ``PARTS`` (outermost
    range only) and the backward functions of the ops run inside it, matched by autograd
    sequence number and forward thread."""
    names = dict(PARTS)

    def part_of(event):
        while event is not None:
            if event.name in names:
                return event.name
            event = event.cpu_parent
        return None

    def value(event):
        return event.device_time_total if device_time else event.cpu_time_total

    totals = dict.fromkeys(names, 0.0)
    forward = {}  # (sequence_nr, thread) of a forward op -> its part
    backward = []
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function"):
            backward.append(event)
            continue
        part = part_of(event)
        if part is None:
            continue
        if event.name in names and part_of(event.cpu_parent) is None:
            totals[part] += value(event)
        if event.sequence_nr >= 0:
            forward[(event.sequence_nr, event.thread)] = part
    for event in backward:
        part = forward.get((event.sequence_nr, event.fwd_thread))
        if part is not None:
            totals[part] += value(event)
    return totals


def profile_cakd(student, teacher, images, targets, args, device, memory_format):
    """Milliseconds per eager cakd step of each part in ``PARTS`` (see the module docstring);
    eager with ``--compile`` too, since dynamo drops the ranges inside compiled code."""
    from torch.profiler import ProfilerActivity, profile

    amp_dtype = AMP_DTYPES[args.dtype]
    step, cleanup = build_mode("cakd", student, teacher, eager(args), device, memory_format, split_optimizer=True)
    for _ in range(args.warmup):
        step(images, targets, amp_dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cpu":  # else the profiler's own log lines ("ERROR: ... gpuGetDeviceCount failed") on a CPU
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step(images, targets, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
    cleanup()
    totals = part_times(prof.events(), device_time=device.type == "cuda")
    return {label: totals[name] / 1e3 / args.profile_steps for name, label in PARTS}


def cpu_attention_flops(query, key, value, *args, out_shape=None, products=2, **kwargs):
    """FLOPs of torch's fused CPU attention, which the flop counter does not know, counted as it
    counts the GPU's: ``products`` (N, d) x (d, M) products per head, 2 forward (q k^T, scores v)."""
    batch, heads, rows, width = query
    return products * 2 * batch * heads * rows * key[2] * width


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    """Backward: 5 products (the scores recomputed, then the gradients of scores, v, q and k)."""
    return cpu_attention_flops(query, key, value, products=5)


def count_flops(mode, student, teacher, images, targets, args, device, memory_format):
    """Floating-point operations of one eager step of ``mode`` (after one uncounted step), from
    ``torch.utils.flop_counter`` (matmuls, convolutions and attention, forward and backward;
    elementwise ops are not counted). MultiheadAttention's fused inference path is switched off
    while counting: the counter cannot see inside it, and the unfused path does the same products."""
    from torch.utils.flop_counter import FlopCounterMode

    amp_dtype = AMP_DTYPES[args.dtype]
    step, cleanup = build_mode(mode, student, teacher, eager(args), device, memory_format)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                     torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}
    try:
        step(images, targets, amp_dtype)
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            step(images, targets, amp_dtype)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        cleanup()
    return counter.get_total_flops()


def loader_throughput(dataset, workers, batch_size, num_batches):
    """Images per second of a fresh DataLoader over ``num_batches`` batches after one warm-up
    batch (which pays for worker start-up). Indices wrap around a dataset that is too short."""
    indices = [i % len(dataset) for i in range((num_batches + 1) * batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    seconds = time.perf_counter() - start
    del batches  # shuts the workers down
    images_per_s = num_batches * batch_size / seconds if seconds > 0 else float("inf")
    return {"images_per_s": images_per_s, "images_per_s_per_worker": images_per_s / max(workers, 1), "workers": workers,
            "batch_size": batch_size, "seconds": seconds}


def measure_loader(args):
    """Decoded and augmented images per second (per worker) with the cakd training preset."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_path or make_image_folder(tmp, num_classes=4, train_per_class=32, val_per_class=1, size=400)
        preset = ClassificationPresetTrain(
            crop_size=args.image_size, auto_augment_policy="ta_wide", random_erase_prob=0.1
        )
        dataset = ImageFolder(os.path.join(root, "train"), transform=preset)
        for workers in args.loader_workers:
            row = loader_throughput(dataset, workers, args.batch_size, args.loader_batches)
            rows.append(row)
    return rows


def main(argv=None):
    args = get_args(argv)
    if args.compile:
        # the modes share one teacher, hooked by the distillers after the ideal compiled it: by
        # default dynamo does not recompile for hooks added later, and the taps would stay empty
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    device = torch.device(args.device)
    if not args.modes and not args.loader_workers:
        raise SystemExit("nothing to measure: give --modes and/or --loader-workers")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    student = teacher = images = targets = None
    if args.modes:
        torch.manual_seed(0)
        student = cakd.build_student(args.model, num_classes=args.num_classes)
        teacher = cakd.build_teacher(args.teacher, weights="none", image_size=args.image_size, num_classes=args.num_classes)
        teacher.to(device, memory_format=memory_format)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=memory_format)
        targets = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        print(f"# {args.model} <- {args.teacher}, batch {args.batch_size}, {args.image_size}px, {args.dtype}"
              f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}, {device_name}, torch {torch.__version__}")
    else:  # the loader alone: no model is built, none is named
        print(f"# loader only: the cakd training preset at {args.image_size}px, batch {args.batch_size}, "
              f"{args.data_path or 'generated 400x400 JPEGs'}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    peaks, firsts = {}, {}
    for mode in args.modes:
        peaks[mode], firsts[mode] = peak_of_mode(mode, student, teacher, images, targets, args, device, memory_format)
    times = time_modes(student, teacher, images, targets, args, device, memory_format) if args.modes else {}
    rows = []
    for mode in args.modes:
        median = statistics.median(times[mode])
        rows.append({"mode": mode, "median_s": median, "img_per_s": args.batch_size / median, "peak_mib": peaks[mode],
                     "first_step_s": firsts[mode],
                     "times_s": times[mode]})
    if args.flops:
        for row in rows:
            row["flops"] = count_flops(row["mode"], student, teacher, images, targets, args, device, memory_format)
    ideal = next((r for r in rows if r["mode"] == "ideal"), None)
    extra = (" first step (s) |" if args.compile else "") + (" GFLOPs | FLOPs / ideal |" if args.flops else "")
    if rows:
        print(f"| mode | median step (s) | img/s | peak memory (MiB) | time / ideal | memory / ideal |{extra}")
        print("|---|---|---|---|---|---|" + "---|" * extra.count("|"))
    for r in rows:
        if ideal:
            r["time_ratio"] = r["median_s"] / ideal["median_s"]
            r["memory_ratio"] = r["peak_mib"] / ideal["peak_mib"]
            if args.flops:
                r["flops_ratio"] = r["flops"] / ideal["flops"]
        ratios = f"{r['time_ratio']:.3f} | {r['memory_ratio']:.3f}" if ideal else "- | -"
        cells = f" {r['first_step_s']:.1f} |" if args.compile else ""  # the compilation
        if args.flops:
            cells += f" {r['flops'] / 1e9:.1f} | {r['flops_ratio']:.3f} |" if ideal else f" {r['flops'] / 1e9:.1f} | - |"
        print(f"| {r['mode']} | {r['median_s']:.4f} | {r['img_per_s']:.1f} | {r['peak_mib']:.0f} | {ratios} |{cells}")
    profile_rows = profile_cakd(student, teacher, images, targets, args, device, memory_format) if args.profile and args.modes else {}
    if profile_rows:
        ideal_ms = ideal["median_s"] * 1e3 if ideal else None
        unit = "kernel time" if device.type == "cuda" else "CPU time"
        print(f"\n| part of the cakd step beyond the ideal ({unit}, {args.profile_steps} profiled steps) | ms per step | % of the ideal step |")
        print("|---|---|---|")
        cakd_row = next((r for r in rows if r["mode"] == "cakd"), None)
        extra = [("sum of the parts", sum(profile_rows.values()))]
        if ideal and cakd_row:
            extra.append(("measured: cakd - ideal (timed medians)", (cakd_row["median_s"] - ideal["median_s"]) * 1e3))
        for label, ms in [*profile_rows.items(), *extra]:
            share = f"{100 * ms / ideal_ms:.1f}" if ideal_ms else "-"
            print(f"| {label} | {ms:.1f} | {share} |")
    loader_rows = measure_loader(args) if args.loader_workers else []
    if loader_rows:
        print("\n| loader workers | img/s | img/s per worker |")
        print("|---|---|---|")
        for r in loader_rows:
            print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['images_per_s_per_worker']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": device_name, "torch": torch.__version__, "steps": rows,
                       "profile_ms": profile_rows, "loader": loader_rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
