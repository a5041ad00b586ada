"""One training epoch and evaluation.

A step follows the released order: discriminator ``zero_grad``, ``L_D.backward``,
discriminator step, student ``zero_grad``, ``L.backward``, optional clip, student step,
EMA update every ``model_ema_steps`` iterations (reset to a copy during LR warmup).
"""
import contextlib
import itertools
import math
import time

import torch
from torch import nn

from ..corruptions import VIEW_PROTOCOLS
from ..errors import CakdError
from .data import ShardSampler
from .distributed import any_rank, average_gradients, smallest
from .logging import Accuracy, MetricLogger, TensorMeter, print_main, topk_correct
from .signals import StopCheck, sigterm_held


class TrainingError(CakdError):
    """A run that cannot go on (a non-finite loss); the message says what to do."""


class EvaluationStopped(Exception):
    """A stop request agreed during an evaluation pass: the trainer saves the epoch unevaluated."""


def evaluation_stop(loader, stop, device):
    """``(i) -> None`` for an evaluation pass: raises :class:`EvaluationStopped` after batch ``i``
    when the ranks agree on ``stop`` (:class:`signals.StopCheck`; None: never). Asked only before
    the last batch of the shortest rank's share (ShardSampler's shares differ by a batch at
    most), so every rank takes part in the same agreements."""
    if stop is None:
        return lambda i: None
    shortest, check = smallest(len(loader), device), StopCheck(stop)

    def after(i):
        if i < shortest - 1 and check():
            raise EvaluationStopped(f"stopped after batch {i + 1} of {len(loader)}")

    return after


def autocast(amp_dtype, device_type):
    """``torch.autocast`` to ``amp_dtype`` (None: full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=amp_dtype)


def backward(loss, scaler, retain_graph=False):
    (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=retain_graph)


def step(optimizer, scaler):
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


def training_step(
    distiller,
    images,
    targets,
    epoch,
    optimizer,
    disc_optimizer=None,
    scaler=None,
    amp_dtype=None,
    clip_grad_norm=None,
    global_step=0,
):
    """One released-order update; returns the dict of (still attached) losses.

    ``global_step`` counts iterations from the start of training: the discriminator's
    zero_grad, backward, all-reduce and step run only when ``distiller.disc_due(global_step)``
    (every iteration in the released recipe, every ``disc_every``-th in the paper's Algorithm 1).
    ``scaler``: a GradScaler for float16 autocast; ``clip_grad_norm``: the student's gradient norm cap.
    """
    with autocast(amp_dtype, images.device.type):
        losses = distiller(images, targets, epoch=epoch)
    if disc_optimizer is not None and distiller.disc_due(global_step):
        disc_optimizer.zero_grad(set_to_none=True)
        backward(losses["disc"], scaler, retain_graph=True)
        average_gradients(distiller.discriminator.parameters())  # D is outside DDP
        step(disc_optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    backward(losses["total"], scaler)
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, clip_grad_norm)
    step(optimizer, scaler)
    if scaler is not None:
        scaler.update()
    return losses


def unlearned_parameters(distiller, image_size, device, memory_format=torch.contiguous_format):
    """Names of the trainable parameters that a training forward and backward leaves without a
    gradient (loss switches that use none of their outputs). Leaves no trace: RNG states and
    BatchNorm statistics are restored and the gradients dropped. It runs a step of a late
    epoch: where lambda is 0 the projectors get zero gradients without a backward, which
    would hide an unused one."""
    modules = [m for m in (distiller.trainable, distiller.discriminator) if m is not None]
    buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = torch.randn(2, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
        distiller.train()
        distiller(images, torch.zeros(2, dtype=torch.long, device=device), epoch=10**6)["total"].backward()
    names = [name for name, p in distiller.trainable.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    for module in modules:
        module.zero_grad(set_to_none=True)
    return names


def train_one_epoch(distiller, loader, optimizer, epoch, device, *, start_step=0, disc_optimizer=None, scaler=None,
                    amp_dtype=None, clip_grad_norm=None, memory_format=torch.contiguous_format, ema=None, ema_steps=1,
                    ema_warmup_epochs=0, iters_per_epoch=0, print_freq=10, tensorboard=None, stop=None, checkpoint_kept=None):
    """Train ``distiller`` for one epoch of ``loader`` from ``start_step`` (:func:`training_step`).

    ``ema``: updated every ``ema_steps`` iterations, a copy of the weights before epoch
    ``ema_warmup_epochs``; ``iters_per_epoch``: a cap (0: the whole loader); ``tensorboard``:
    the training scalars every ``print_freq`` iterations; ``stop``: a :class:`signals.StopRequest`;
    ``checkpoint_kept``: what a run that stops now leaves, in words, for the non-finite error.

    Returns ``(next_step, averages, mean_loss)``: the next step to run if a stop was requested
    (else None), the epoch's loss and accuracy averages over all ranks, and :func:`mean_loss`. Loss
    values are read back from the device only every ``print_freq`` iterations; a stop request is
    agreed by :class:`signals.StopCheck` after every step, and one in the last step lets the
    epoch end (the trainer saves it and stops there).
    """
    distiller.train()
    logger = MetricLogger()
    logger.add_meter("lr", TensorMeter(window=1, fmt="{value:.6f}"))
    logger.add_meter("img/s", TensorMeter(window=10, fmt="{median:.1f}"))
    lam = distiller.distill_weight(epoch)
    if distiller.logs_distill_weight:  # the weight of the distillation terms printed beside them
        logger.add_meter("lambda", TensorMeter(window=1, fmt="{value:.3f}"))
    total = len(loader) + start_step
    if iters_per_epoch:
        total = min(total, iters_per_epoch)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    stop_check = StopCheck(stop)
    header = f"Epoch: [{epoch}]"
    with sigterm_held():  # the workers start here
        batches = itertools.islice(loader, total - start_step)
    window_images, window_start = 0, time.time()
    for i, (images, targets) in logger.log_every(batches, print_freq, header, total=total, start=start_step):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        step_count = epoch * total + i  # global iteration: the same after a resume
        losses = training_step(distiller, images, targets, epoch, optimizer, disc_optimizer, scaler, amp_dtype=amp_dtype,
                               clip_grad_norm=clip_grad_norm, global_step=step_count)
        if ema is not None and i % ema_steps == 0:
            ema.update_parameters(distiller.student)
            if epoch < ema_warmup_epochs:
                ema.n_averaged.fill_(0)  # keep copying the weights during warmup

        detached = {name: value.detach() for name, value in losses.items()}
        nonfinite |= ~torch.isfinite(detached["total"])
        logger.update(n=images.shape[0], **{f"loss_{k}" if k != "total" else "loss": v for k, v in detached.items()})
        acc1, acc5 = topk_correct(distiller.last_logits, targets) * (100.0 / images.shape[0])
        logger.update(n=images.shape[0], acc1=acc1, acc5=acc5)
        logger.meters["lr"].update(optimizer.param_groups[0]["lr"])
        if "lambda" in logger.meters:
            logger.meters["lambda"].update(lam)
        window_images += images.shape[0]

        last = i == total - 1
        if i % print_freq == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the steps queued so far are done: img/s is true
            now = time.time()
            logger.meters["img/s"].update(window_images / max(now - window_start, 1e-9))
            window_images, window_start = 0, now
            if any_rank(bool(nonfinite.item()), device):
                values = ", ".join(f"{k}={v.item():.4g}" for k, v in detached.items())
                kept = f"; {checkpoint_kept()}" if checkpoint_kept is not None else ""
                raise TrainingError(
                    f"non-finite loss in epoch {epoch} by iteration {i} ({values}){kept}: "
                    "lower --lr, set --clip-grad-norm, or check the data"
                )
            scalars = {name: logger.meters[name].avg for name in logger.meters if name.startswith("loss")}
            scalars.update({"lambda": lam, "lr": optimizer.param_groups[0]["lr"], "img_per_s": logger.meters["img/s"].median})
            if disc_optimizer is not None:
                scalars["disc_lr"] = disc_optimizer.param_groups[0]["lr"]
            if tensorboard is not None:
                tensorboard.scalars(scalars, step_count, prefix="train/")
        if not last and stop_check():
            return i + 1, {}, mean_loss(logger, device)
    names = [name for name in logger.meters if name.startswith(("loss", "acc"))]
    averages = logger.global_averages(names, device)
    return None, averages, averages.get("loss", float("nan"))


def mean_loss(logger, device):
    """The training loss averaged over the steps run so far and over the ranks (nan before any)."""
    return logger.global_averages(["loss"], device)["loss"]


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, memory_format=torch.contiguous_format, print_freq=100, header="Test:",
             stop=None, scores=None):
    """Top-1 / top-5 of ``model`` over the whole loader, exact across ranks; a progress line
    every ``print_freq`` batches; ``stop``: a :class:`signals.StopRequest` that ends the pass
    early (:func:`evaluation_stop`); ``scores`` (a ``spoof_metrics.SpoofScores``): also given
    each batch's logits and labels."""
    model.eval()
    accuracy = Accuracy(device)
    logger = MetricLogger()
    stopping = evaluation_stop(loader, stop, device)
    with sigterm_held():
        batches = iter(loader)
    for i, (images, targets) in logger.log_every(batches, print_freq, header, total=len(loader)):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast(amp_dtype, device.type):
            logits = model(images)
        accuracy.update(logits.float(), targets)
        if scores is not None:
            scores.update(logits, targets)
        stopping(i)
    (acc1, acc5), count = accuracy.compute()
    print_main(f"{header} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({count} images)")
    if math.isnan(acc1):
        raise TrainingError("evaluation produced no numbers: is the validation set empty?")
    return acc1, acc5


@torch.no_grad()
def evaluate_views(model, loader, device, seed=0, amp_dtype=None, memory_format=torch.contiguous_format, print_freq=100,
                   header="Test:", protocol="corruptions", stop=None):
    """Top-1 / top-5 on the clean images and on each view of ``protocol`` applied to every
    image, and the views' mean: the noisy evaluation of the paper's Figure 3, C4 and C5.

    ``protocol``: ``"corruptions"`` (:mod:`cakd.corruptions`, unlike the training transforms, as
    the paper asks) or ``"train_views"`` (the multi-view generator's own transforms; not the
    paper's protocol). Returns ``{"acc1", "acc5", "views_<name>_acc1", ..., "views_mean_acc1",
    "views_mean_acc5"}``. Image ``i`` of the loader's (ordered) sampler gets the view drawn
    from a generator seeded by ``(seed, name, i)``: the numbers do not depend on the batch
    size or the number of processes, and torch's global generator is left alone. One pass over
    the loader; each batch goes through the model once clean and once per view. ``stop``: as
    for :func:`evaluate`.
    """
    if not isinstance(loader.sampler, (torch.utils.data.SequentialSampler, ShardSampler)):
        raise ValueError("evaluate_views needs a loader with an ordered sampler (SequentialSampler or ShardSampler)")
    model.eval()
    generator = VIEW_PROTOCOLS[protocol]().to(device)
    names = ("clean",) + generator.names
    accuracy = {name: Accuracy(device) for name in names}
    order = iter(loader.sampler)
    logger = MetricLogger()
    stopping = evaluation_stop(loader, stop, device)
    with sigterm_held():
        batches = iter(loader)
    for i, (images, targets) in logger.log_every(batches, print_freq, header, total=len(loader)):
        indices = list(itertools.islice(order, images.shape[0]))
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        for name in names:
            batch = images if name == "clean" else generator.view(images, name, indices, seed)
            with autocast(amp_dtype, device.type):
                logits = model(batch.contiguous(memory_format=memory_format))
            accuracy[name].update(logits.float(), targets)
        stopping(i)
    results = {}
    for name in names:
        (acc1, acc5), count = accuracy[name].compute()
        key, label = ("", header) if name == "clean" else (f"views_{name}_", f"{header} view {name}")
        results[key + "acc1"], results[key + "acc5"] = acc1, acc5
        print_main(f"{label} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({count} images)")
    for k in ("acc1", "acc5"):
        results[f"views_mean_{k}"] = sum(results[f"views_{name}_{k}"] for name in generator.names) / len(generator.names)
    print_main(f"{header} views ({protocol}) mean Acc@1 {results['views_mean_acc1']:.3f} Acc@5 {results['views_mean_acc5']:.3f}")
    if math.isnan(results["acc1"]):
        raise TrainingError("evaluation produced no numbers: is the validation set empty?")
    return results
