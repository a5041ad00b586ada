"""``python -m cakd.detection.speed``: the trainer's training loop beside torchvision's plain
reference step, same detector, batch and image size, on the same batches.

Ours is :func:`engine.train_one_epoch` (losses kept on the device, the stop and non-finite
checks every ``print_freq`` steps, the per-iteration lr schedule); the reference is the loop of
torchvision's ``references/detection`` (``sum(model(images, targets).values())``, backward, SGD
step, lr step). The two alternate ``repeats`` times on one model; each time is the median step.
"""
import argparse
import statistics
import sys
import time

import torch

from .engine import LrFactor, train_one_epoch
from .models import build_detector


def synthetic_batches(steps, batch_size, size, num_classes, with_masks, seed=0):
    """``steps`` batches of random images with two random boxes (and masks) each."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        images, targets = [], []
        for _ in range(batch_size):
            images.append(torch.rand(3, size, size, generator=generator))
            xy = torch.rand(2, 2, generator=generator) * size * 0.5
            wh = 8 + torch.rand(2, 2, generator=generator) * size * 0.4
            boxes = torch.cat([xy, xy + wh], dim=1)
            target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (2,), generator=generator)}
            if with_masks:
                masks = torch.zeros(2, size, size, dtype=torch.uint8)
                for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                    masks[k, y0:y1, x0:x1] = 1
                target["masks"] = masks
            targets.append(target)
        batches.append((tuple(images), tuple(targets)))
    return batches


def reference_epoch(model, batches, optimizer, lr_scheduler):
    """torchvision's ``references/detection`` training loop, bare."""
    model.train()
    for images, targets in batches:
        loss_dict = model(list(images), list(targets))
        losses = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        lr_scheduler.step()


def compare(detector="fasterrcnn", backbone="resnet18", batch_size=2, size=128, steps=3, repeats=9, print_freq=20, seed=0):
    """Median seconds per step of ours and of the reference, and the median of the repeats' ratios
    (ours / reference, each repeat's two timings side by side, so a load that drifts cancels)."""
    torch.manual_seed(seed)
    model = build_detector(detector, backbone, num_classes=4, trainable_layers=3, min_size=size, max_size=size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(steps, 10, 0.001, (), 0.1))
    batches = synthetic_batches(steps, batch_size, size, 4, detector == "maskrcnn", seed)
    device = torch.device("cpu")
    times = {"ours": [], "reference": []}
    train_one_epoch(model, batches[:2], optimizer, lr_scheduler, 0, device, print_freq=print_freq)  # warm up both
    reference_epoch(model, batches[:2], optimizer, lr_scheduler)
    for repeat in range(repeats):
        for name in ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours"):  # neither always goes first
            start = time.perf_counter()
            if name == "ours":
                train_one_epoch(model, batches, optimizer, lr_scheduler, 0, device, print_freq=print_freq)
            else:
                reference_epoch(model, batches, optimizer, lr_scheduler)
            times[name].append((time.perf_counter() - start) / steps)
    ours, reference = statistics.median(times["ours"]), statistics.median(times["reference"])
    paired = statistics.median(o / r for o, r in zip(times["ours"], times["reference"]))  # each repeat's pair: load drifts
    return ours, reference, paired


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cakd.detection.speed", description=__doc__.splitlines()[0])
    p.add_argument("--detector", default="fasterrcnn", choices=["fasterrcnn", "maskrcnn"], help="(default: fasterrcnn)")
    p.add_argument("--backbone", default="resnet18", help="(default: resnet18)")
    p.add_argument("-b", "--batch-size", default=2, type=int, help="(default: 2)")
    p.add_argument("--size", default=128, type=int, help="image side (default: 128)")
    p.add_argument("--steps", default=3, type=int, help="steps per timing (default: 3)")
    p.add_argument("--repeats", default=9, type=int, help="timings of each, alternating (default: 9)")
    args = p.parse_args(argv)
    ours, reference, ratio = compare(args.detector, args.backbone, args.batch_size, args.size, args.steps, args.repeats)
    print(f"{args.detector} {args.backbone} FPN, {args.batch_size} x {args.size} px, median of {args.repeats} x {args.steps} steps: "
          f"ours {ours * 1000:.1f} ms/step, torchvision reference {reference * 1000:.1f} ms/step, median ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
