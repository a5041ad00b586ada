"""Where the eager cakd step's time beyond the ideal goes: the ``torch.profiler`` ranges the
method code opens (``cakd.attention_projector``, ...), each with the backward of the ops run
inside it (matched by autograd sequence number), and the optimizer steps of the discriminator
and of the projectors, each run inside a range of its own (:func:`name_steps`)."""
import argparse
import os

import torch

from .modes import AMP_DTYPES, build_mode

PARTS = (  # (profiler range, row of the --profile table)
    ("cakd.attention_projector", "attention projector and its maps"),
    ("cakd.groupwise_projector", "group-wise projector"),
    ("cakd.token_projector", "token projector"),
    ("cakd.teacher_maps", "teacher map recomputation"),
    ("cakd.discriminator", "discriminator forward/backward"),
    ("benchmark.discriminator_optimizer", "discriminator optimizer"),
    ("cakd.loss_terms", "loss terms"),
    ("benchmark.projector_optimizer", "optimizer of the projectors"),
)


def eager(args):
    """``args`` with ``--compile`` off."""
    return argparse.Namespace(**{**vars(args), "compile": False})


def name_steps(optimizer, name):
    """Run each ``optimizer.step()`` inside the profiler range ``name``: a step pre-hook opens
    it, a post-hook closes it."""
    if optimizer is None:
        return
    opened = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: opened.append(torch.profiler.record_function(name).__enter__()))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: opened.pop().__exit__(None, None, None))


def name_optimizers(projectors, discriminator):
    name_steps(projectors, "benchmark.projector_optimizer")
    name_steps(discriminator, "benchmark.discriminator_optimizer")


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
    step, cleanup = build_mode("cakd", student, teacher, eager(args), device, memory_format, split_optimizer=True,
                               name_optimizers=name_optimizers)
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
