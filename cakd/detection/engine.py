"""One detection training epoch and the COCO evaluation (torchvision's ``references/detection``
loop on cakd.train's logging, stop and AMP conventions).

The learning rate is a function of the global iteration (:func:`lr_factor`): linear warmup over
the first ``warmup_iters`` iterations, then x``gamma`` at each milestone epoch. A ``LambdaLR``
stepped every iteration holds it, so a mid-epoch checkpoint resumes on the same schedule.
"""
import itertools
import math
import time

import torch

from ..train.distributed import any_rank
from ..train.engine import TrainingError, autocast, backward, step
from ..train.logging import MetricLogger, TensorMeter, print_main
from ..train.signals import StopCheck, sigterm_held
from .coco_eval import evaluate_detections, to_coco


class LrFactor:
    """``lr_factor`` as a picklable callable for ``LambdaLR``: the schedule of one run."""

    def __init__(self, steps_per_epoch, warmup_iters, warmup_factor, milestones, gamma):
        self.steps_per_epoch, self.warmup_iters, self.warmup_factor = steps_per_epoch, warmup_iters, warmup_factor
        self.milestones, self.gamma = tuple(milestones), gamma

    def __call__(self, iteration):
        return lr_factor(iteration, self.steps_per_epoch, self.warmup_iters, self.warmup_factor, self.milestones, self.gamma)


def lr_factor(iteration, steps_per_epoch, warmup_iters, warmup_factor, milestones, gamma):
    """The multiplier of the base lr at global ``iteration``: from ``warmup_factor`` up to 1
    linearly over ``warmup_iters`` iterations, times ``gamma`` for each milestone epoch reached."""
    factor = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    epoch = iteration // max(steps_per_epoch, 1)
    return factor * gamma ** sum(epoch >= m for m in milestones)


def to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def training_step(model, images, targets, optimizer, lr_scheduler, scaler=None, amp_dtype=None, clip_grad_norm=None):
    """One update: the detector's losses summed, backward, optional clip, step, lr step.
    Returns the dict of detached losses with their sum as ``loss``."""
    with autocast(amp_dtype, images[0].device.type):
        losses = model(images, targets)
        total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    backward(total, scaler)
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    step(optimizer, scaler)
    if scaler is not None:
        scaler.update()
    lr_scheduler.step()
    return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}}


def train_one_epoch(model, loader, optimizer, lr_scheduler, epoch, device, *, start_step=0, scaler=None, amp_dtype=None,
                    clip_grad_norm=None, iters_per_epoch=0, print_freq=10, tensorboard=None, stop=None, checkpoint_kept=None):
    """Epoch ``epoch`` of ``loader`` from ``start_step``; returns ``(next step or None, averages)``
    as :func:`cakd.train.engine.train_one_epoch` does: a stop asked on any rank ends the epoch
    after the next step (:class:`cakd.train.signals.StopCheck`), every rank at the same one; a
    non-finite loss is one error line."""
    model.train()
    logger = MetricLogger()
    logger.add_meter("lr", TensorMeter(window=1, fmt="{value:.6f}"))
    total = len(loader) + start_step
    if iters_per_epoch:
        total = min(total, iters_per_epoch)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    names = []  # the loss names, once a step has run
    stop_check = StopCheck(stop)
    with sigterm_held():  # the workers start here
        batches = itertools.islice(loader, total - start_step)
    for i, (images, targets) in logger.log_every(batches, print_freq, f"Epoch: [{epoch}]", total=total, start=start_step):
        images, targets = to_device(images, targets, device)
        lr = optimizer.param_groups[0]["lr"]
        losses = training_step(model, images, targets, optimizer, lr_scheduler, scaler, amp_dtype, clip_grad_norm)
        names = list(losses)
        nonfinite |= ~torch.isfinite(losses["loss"])
        logger.update(n=len(images), **losses)
        logger.meters["lr"].update(lr)
        last = i == total - 1
        if i % print_freq == 0 or last:
            if any_rank(bool(nonfinite.item()), device):
                values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                kept = f"; {checkpoint_kept()}" if checkpoint_kept is not None else ""
                raise TrainingError(f"non-finite loss in epoch {epoch} by iteration {i} ({values}){kept}: "
                                    "lower --lr, set --clip-grad-norm, or check the data")
            if tensorboard is not None:
                scalars = {name: logger.meters[name].avg for name in losses}
                tensorboard.scalars({**scalars, "lr": lr}, epoch * total + i, prefix="train/")
        if not last and stop_check():
            return i + 1, {}
    return None, logger.global_averages(names, device)


@torch.no_grad()
def evaluate(model, loader, coco_gt, device, iou_types, amp_dtype=None, print_freq=100, header="Test:"):
    """COCO metrics of ``model`` over the whole loader, every image once across ranks
    (:func:`coco_eval.evaluate_detections`); prints pycocotools' summary on rank 0."""
    model.eval()
    logger = MetricLogger()
    detections = {}
    start = time.time()
    with sigterm_held():
        batches = iter(loader)
    for _, (images, targets) in logger.log_every(batches, print_freq, header, total=len(loader)):
        images = [image.to(device, non_blocking=True) for image in images]
        with autocast(amp_dtype, device.type):
            outputs = model(images)
        for target, output in zip(targets, outputs):
            detections[int(target["image_id"])] = to_coco(target["image_id"], output, "segm" in iou_types)
    metrics, text = evaluate_detections(coco_gt, detections, iou_types, image_ids=coco_gt.getImgIds())
    print_main("\n".join(line for line in text.splitlines() if line.startswith(("IoU", " Average Precision"))))
    print_main(f"{header} " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith("_AP"))
               + f" ({len(coco_gt.getImgIds())} images, {time.time() - start:.0f} s)")
    if any(math.isnan(v) for v in metrics.values()):
        raise TrainingError("evaluation produced no numbers: is the validation set empty?")
    return metrics
