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
as one SGD over student and projectors), each inside a range of its own. CPU time on the CPU,
kernel time on a GPU.

``--flops`` adds each mode's floating-point operations per step (counted on an eager step) and
their ratio to the ideal's: the arithmetic a mode asks for, which its time ratio settles near on
a device bound by arithmetic.

Each measurement is one module of ``scripts/bench/``: ``modes`` (the steps), ``step_time``,
``memory``, ``profiling``, ``flops``, ``loader``; this file holds the flags and the tables.
"""
import argparse
import json
import statistics
import sys

import torch

import cakd
from bench.flops import count_flops
from bench.loader import measure_loader
from bench.memory import peak_of_mode
from bench.modes import MODES, PLAIN
from bench.profiling import profile_cakd
from bench.step_time import time_modes
from cakd.train.config import HelpFormatter
from cakd.train.scriptkit import DEFAULTS, add_shared_flags


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
