"""Top-1 / top-5 on an ImageFolder ``val/`` of a training checkpoint (student or EMA), an
exported student, a released-code checkpoint, or the teacher; with the recipe's eval preset.

    python scripts/evaluate.py --checkpoint runs/cakd/checkpoint.pth [--which student|ema|teacher]
        [--data-path DIR] [--json FILE] [--views [--views-seed N]]
    torchrun --nproc_per_node=8 scripts/evaluate.py --checkpoint ... --device cuda

Settings the run was trained with (student, eval sizes, batch size, data path, teacher) are read
from the checkpoint's saved flags; a flag given here wins. Under torchrun each process takes
``rank::world_size`` of the images, so the numbers count every image exactly once.

``--views``: also top-1/top-5 with each corruption of ``cakd.corruptions`` (blur, JPEG, pixelate,
elastic, posterize: none of them a training transform) applied to every image, and their mean:
the noisy evaluation of the paper's Figure 3 (C4, C5). ``--views-protocol train_views`` uses the
multi-view generator's training transforms instead (not the paper's protocol). Image ``i``'s
random draw comes from a generator seeded by ``(--views-seed, view, i)``, so two evaluations
give the same numbers, whatever the batch size or number of processes.
"""
import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, SequentialSampler

from cakd.corruptions import VIEW_PROTOCOLS
from cakd.students import num_classes_of
from cakd.zoo import no_weights
from cakd.train import distributed as dist_utils
from cakd.train.checkpoints import SourceCheckpoint
from cakd.train.config import HelpFormatter
from cakd.train.data import ShardSampler
from cakd.train.engine import evaluate, evaluate_views
from cakd.train.report import UserError, run_and_report
from cakd.train.logging import print_main
from cakd.train.scriptkit import (
    DEFAULTS,
    RECIPE_EVAL,
    add_shared_flags,
    build_eval_teacher,
    build_val_dataset,
    check_class_count,
    load_student,
    pick,
)

HEADERS = {"student": "Test:", "ema": "Test: EMA", "teacher": "Test: teacher"}


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Top-1/top-5 of a checkpoint's student, its EMA, or the teacher on DATA/val",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    run = "the run's"  # most defaults come from the flags saved in the checkpoint
    add_shared_flags(
        p, "checkpoint", "data_path", "model", "teacher", "teacher_weights", "device",
        checkpoint="a training checkpoint (checkpoint.pth, model_N.pth), an exported student .pth or a released-code checkpoint "
        "(optional with --which teacher)",
    )
    p.add_argument("--which", default="student", choices=["student", "ema", "teacher"], help="what to evaluate (default: student)")
    p.add_argument("--val-resize-size", default=None, type=int, help=f"eval resize (default: {run}, else {RECIPE_EVAL['val_resize_size']})")
    p.add_argument("--val-crop-size", default=None, type=int, help=f"eval center crop (default: {run}, else {RECIPE_EVAL['val_crop_size']})")
    p.add_argument("--interpolation", default=None, help=f"resize interpolation (default: {run}, else bilinear)")
    p.add_argument("-b", "--batch-size", default=None, type=int, help=f"images per process (default: {run}, else {DEFAULTS['batch_size']})")
    p.add_argument(
        "-j", "--workers", default=min(4, os.cpu_count() or 1), type=int, help="data loading workers per process (default: %(default)s)"
    )
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction, help=f"autocast (default: {run})")
    p.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"], help=f"autocast dtype (default: {run})")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction, help=f"channels_last (default: {run})")
    p.add_argument("--print-freq", default=DEFAULTS["print_freq"], type=int, help="a progress line every 10x this many batches, as the trainer (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file (default: none)")
    p.add_argument("--views", action="store_true", help="also evaluate on each view of --views-protocol of every image, and their mean (default: off)")
    p.add_argument(
        "--views-protocol", default=DEFAULTS["eval_views_protocol"], choices=sorted(VIEW_PROTOCOLS),
        help="corruptions: blur, JPEG, pixelate, elastic, posterize, unlike training (the paper's C4/C5 asks for that); "
        "train_views: the multi-view generator's own training transforms, not the paper's protocol (default: %(default)s)",
    )
    p.add_argument("--views-seed", default=0, type=int, help="seed of the views (default: 0, as the trainer's --eval-views)")
    return p


def build_model(args, checkpoint, dataset, crop):
    """The module to evaluate and a one-line description of it."""
    if args.which == "teacher":
        name = pick(checkpoint, "teacher", args.teacher)
        weights = pick(checkpoint, "teacher_weights", args.teacher_weights)
        if no_weights(weights):
            print_main("warning: --teacher-weights none: a random teacher, its accuracy means nothing", file=sys.stderr)
        # checks the class count; a random teacher is the run's own, drawn again from its seed
        seed, student = pick(checkpoint, "seed"), pick(checkpoint, "model", args.model)
        teacher = build_eval_teacher(name, weights, crop, len(dataset.classes), seed=seed, student=student)
        return teacher, f"teacher {name} ({weights})"
    student = load_student(checkpoint, args.which, args.model)
    check_class_count(num_classes_of(student), dataset, f"{checkpoint.path} ({args.which})")
    return student, f"{args.which} of {checkpoint.path} ({checkpoint.kind} checkpoint)"


def run(args):
    dist_utils.check_device(args.device)  # before torchrun's set-up, which would fail on it
    if args.checkpoint is None and args.which != "teacher":
        raise UserError(f"--which {args.which} needs --checkpoint")
    processes = dist_utils.init_distributed_mode(args.device)
    device = processes.device
    checkpoint = SourceCheckpoint(args.checkpoint) if args.checkpoint else None

    crop, resize = pick(checkpoint, "val_crop_size", args.val_crop_size), pick(checkpoint, "val_resize_size", args.val_resize_size)
    dataset = build_val_dataset(pick(checkpoint, "data_path", args.data_path), resize, crop, pick(checkpoint, "interpolation", args.interpolation))
    sizes = f"resize {resize} / crop {crop}"
    if args.val_crop_size is None and not (checkpoint is not None and checkpoint.args.get("val_crop_size")):
        sizes += " (the released recipes' eval sizes: this file holds no flags; --val-resize-size/--val-crop-size for others)"
    amp = bool(pick(checkpoint, "amp", args.amp))
    amp_dtype = getattr(torch, pick(checkpoint, "amp_dtype", args.amp_dtype) or "float16") if amp else None
    channels_last = bool(pick(checkpoint, "channels_last", args.channels_last))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    model, what = build_model(args, checkpoint, dataset, crop)
    model.to(device, memory_format=memory_format)
    sampler = ShardSampler(dataset) if processes.distributed else SequentialSampler(dataset)
    batch_size = pick(checkpoint, "batch_size", args.batch_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    print_main(f"evaluate: {what} on {dataset.root} ({len(dataset)} images, {sizes}, {processes.world_size} process(es))")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    options = dict(amp_dtype=amp_dtype, memory_format=memory_format, print_freq=max(args.print_freq, 1) * 10)
    options["header"] = HEADERS[args.which]
    if args.views:
        numbers = evaluate_views(model, loader, device, seed=args.views_seed, protocol=args.views_protocol, **options)
    else:
        numbers = dict(zip(("acc1", "acc5"), evaluate(model, loader, device, **options)))
    if args.json and dist_utils.is_main_process():
        record = {"which": args.which, "checkpoint": args.checkpoint, "data": dataset.root, "images": len(dataset)}
        record.update(numbers)
        if args.views:
            record["views_seed"], record["views_protocol"] = args.views_seed, args.views_protocol
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return numbers["acc1"], numbers["acc5"]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run_and_report(run, args)
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
