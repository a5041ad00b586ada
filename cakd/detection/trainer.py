"""The trainer behind ``python -m cakd.detection``: torchvision's detection recipe on cakd.train's
run machinery (run-folder lock, atomic checkpoints, exact ``--resume auto``, SIGTERM saving under
the launcher, one-line errors, ``config.yaml``, ``metrics.jsonl``, TensorBoard)."""
import datetime
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from ..checkpoint import save_atomic
from ..train import distributed as dist_utils
from ..train.checkpoints import CheckpointError, capture_rng_state, next_position, read, restore_rng
from ..train.config import save_config, saved_args
from ..train.engine import TrainingError
from ..train.errors import UserError, first_to_report, one_line, print_error, run_and_report
from ..train.logging import TensorBoard, print_main
from ..train.optim import build_optimizer, parameter_groups
from ..train.resume import EPOCH_END_ONLY, refused_change
from ..train.signals import StopRequest
from ..train.trainer import _drop_metrics_from, amp_dtype, claim_output_dir, lost_a_peer, resume_path
from .config import parse_args
from ..train.data import DataError
from .data import build_loaders, coco_dataset, need_pycocotools
from .engine import LrFactor, evaluate, train_one_epoch
from .models import build_detector, initialise


class Run:
    """One detection run: data, detector, optimizer and schedule, checkpointed and restored as a whole."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.saved = None
        masks = args.detector == "maskrcnn"
        self.iou_types = ("bbox", "segm") if masks else ("bbox",)
        val_set = coco_dataset(args.data_path, "val", masks)
        train_set = val_set if args.test_only else coco_dataset(args.data_path, "train", masks)
        self.coco_gt = val_set.coco if hasattr(val_set, "coco") else val_set._dataset.coco
        self.train_loader, self.val_loader = build_loaders(
            train_set, val_set, batch_size=args.batch_size, workers=args.workers, seed=args.seed, distributed=args.distributed
        )
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        if not self.coco_gt.getCatIds():
            raise DataError(f"{args.data_path}/annotations/instances_val2017.json lists no categories: is it a COCO annotation file?")
        num_classes = max(self.coco_gt.getCatIds()) + 1  # labels are category ids; 0 is the background
        model = build_detector(args.detector, args.backbone, num_classes, args.trainable_backbone_layers, args.min_size, args.max_size,
                               **detector_options(args))
        self.backbone_line = "backbone from the checkpoint" if args.test_only else initialise(model, args.backbone_weights, args.backbone)
        model.to(self.device)
        self.model = model
        self.ddp = None
        if args.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.lr = args.lr * args.world_size * args.batch_size / args.lr_batch
        self.optimizer = build_optimizer(parameter_groups(model, args.weight_decay), "sgd", self.lr, args.momentum, args.weight_decay)
        steps = min(len(self.train_loader), args.iters_per_epoch or len(self.train_loader))  # an epoch's, for the lr steps
        schedule = LrFactor(steps, args.lr_warmup_iters, args.lr_warmup_factor, args.lr_steps, args.lr_gamma)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp_dtype = amp_dtype(args)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        torch.manual_seed(args.seed + args.rank)  # from here each rank draws its own samples of the heads
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)
        # last: a run refused above leaves no folder behind
        self.tensorboard = TensorBoard(os.path.join(args.output_dir, "tensorboard") if args.output_dir and not args.test_only else None)

    def header(self):
        a = self.args
        return (f"cakd.detection: {a.detector} {a.backbone} FPN, {self.backbone_line}; {a.world_size} process(es) x "
                f"{a.batch_size} images = {a.world_size * a.batch_size} per step, lr {self.lr:g}, {a.epochs} epochs, "
                f"{self.lr_scheduler.lr_lambdas[0].steps_per_epoch} steps each")

    def state(self, epoch, step=None):
        """The checkpoint dict (cakd.train's layout, read back by its ``read``). Collective."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None, "epoch": epoch, "step": step,
            "args": saved_args(self.args), "rng": dist_utils.all_gather_object(capture_rng_state()),
        }

    def save(self, epoch, step=None):
        """Rank 0 writes ``checkpoint.pth`` (and ``model_{epoch}.pth`` on the frequency) atomically."""
        state, error = self.state(epoch, step), None
        if dist_utils.is_main_process() and self.args.output_dir:
            paths = [os.path.join(self.args.output_dir, "checkpoint.pth")]
            if step is None and (epoch + 1) % self.args.checkpoint_freq == 0:
                paths.insert(0, os.path.join(self.args.output_dir, f"model_{epoch}.pth"))
            try:
                for path in paths:
                    save_atomic(state, path)
            except (OSError, RuntimeError) as failure:
                error = f"could not write {path} ({one_line(failure)}): make room or fix the permissions, then rerun with --resume auto"
        error = dist_utils.all_gather_object(error)[0]
        if error:
            raise UserError(error)
        self.saved = (epoch, step)

    def checkpoint_kept(self):
        if self.saved is None:
            return "no checkpoint was written by this run"
        epoch, step = self.saved
        return f"checkpoint.pth (epoch {epoch}{'' if step is None else f', step {step}'}) is kept"

    def restore(self, path):
        """Load a checkpoint of this trainer strictly; returns (first epoch, first step)."""
        ckpt = read(path)
        for key in ("detector", "backbone"):
            if ckpt["args"].get(key) != getattr(self.args, key):
                raise UserError(f"{path} was trained with --{key} {ckpt['args'].get(key)}, not {getattr(self.args, key)}")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.args.test_only:
                return ckpt["epoch"], 0
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{path} does not fit this run ({one_line(error)[:300]}): resume with its config.yaml") from None
        restore_rng(ckpt, self.args.rank, self.args.world_size)
        return next_position(ckpt)

    def train_epoch(self, epoch, start_step, stop):
        a, sampler = self.args, self.train_loader.sampler
        sampler.set_epoch(epoch)
        sampler.start = start_step * a.batch_size
        result = train_one_epoch(
            self.ddp or self.model, self.train_loader, self.optimizer, self.lr_scheduler, epoch, self.device, start_step=start_step,
            scaler=self.scaler, amp_dtype=self.amp_dtype, clip_grad_norm=a.clip_grad_norm, iters_per_epoch=a.iters_per_epoch,
            print_freq=a.print_freq, tensorboard=self.tensorboard, stop=stop, checkpoint_kept=self.checkpoint_kept,
        )
        sampler.start = 0
        return result

    def evaluate(self):
        dist_utils.broadcast_buffers(self.model)  # every rank evaluates the model rank 0 saves
        return evaluate(self.model, self.val_loader, self.coco_gt, self.device, self.iou_types, amp_dtype=self.amp_dtype,
                        print_freq=max(self.args.print_freq, 1) * 10)


def detector_options(args):
    """The detector's own keyword arguments given as flags (torchvision's defaults unless set)."""
    return {name: getattr(args, name) for name in ("frozen_bn", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "box_batch_size_per_image",
                                                   "box_detections_per_img")}


def check_resume(args):
    """Refuse a resume whose flags would change what it trains (:func:`cakd.train.resume.refused_change`)."""
    checkpoint = read(args.resume, mmap=True)
    step = checkpoint.get("step")
    change = refused_change(checkpoint["args"], args, step is not None)
    if change is None:
        return
    name, was, now = change
    flag = "the process count" if name == "world_size" else "--" + name.replace("_", "-")
    when = " (it may change at an epoch's end)" if name in EPOCH_END_ONLY else ""
    raise UserError(f"{args.resume} was trained with {flag} {was}, not {now}: resume with {flag} {was}{when} (its config.yaml "
                    "holds every flag), or start a new run in another --output-dir")


def train(args):
    need_pycocotools()
    stop = StopRequest()
    if args.test_only:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    else:
        stop.install()
    dist_utils.check_device(args.device)
    found = dist_utils.init_distributed_mode(args.device, args.dist_url)
    args.distributed, args.rank, args.world_size, args.device = found.distributed, found.rank, found.world_size, str(found.device)
    if args.test_only and not args.resume:
        raise UserError("--test-only evaluates a checkpoint: pass it with --resume PATH (or --resume auto)")
    lock = claim_output_dir(args) if args.output_dir and not args.test_only else None
    try:
        return _train(args, stop)
    finally:
        if lock is not None:
            os.close(lock)


def _train(args, stop):
    args.resume = resume_path(args)
    if args.resume and not args.test_only:
        check_resume(args)
    run = Run(args)
    if args.output_dir and not args.test_only and dist_utils.is_main_process():  # data and weights fit: what runs
        save_config(args, os.path.join(args.output_dir, "config.yaml"))
    start_epoch, start_step = args.start_epoch, 0
    if args.resume:
        start_epoch, start_step = run.restore(args.resume)
    if args.test_only:
        return run.evaluate()
    print_main(run.header())
    if args.resume:
        if start_epoch >= args.epochs:
            print_main(f"{args.resume} is a finished run: all {args.epochs} epochs trained; nothing to do")
            return {}
        print_main(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step}")
        if dist_utils.is_main_process() and args.output_dir:
            _drop_metrics_from(os.path.join(args.output_dir, "metrics.jsonl"), start_epoch)
    start_time, results = time.time(), {}
    for epoch in range(start_epoch, args.epochs):
        next_step, train_stats = run.train_epoch(epoch, start_step, stop)
        start_step = 0
        if next_step is not None:
            run.save(epoch, step=next_step)
            print_main(f"{stop.reason}: saved epoch {epoch} step {next_step} to {args.output_dir}/checkpoint.pth; --resume it to go on")
            run.tensorboard.close()
            return results
        results = run.evaluate()
        run.tensorboard.scalars(results, epoch, prefix="val/")
        run.tensorboard.scalars(train_stats, epoch, prefix="train_epoch/")
        run.tensorboard.flush()
        run.save(epoch)
        if dist_utils.is_main_process() and args.output_dir:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, **results, **{f"train_{k}": v for k, v in train_stats.items()}}) + "\n")
        if epoch + 1 < args.epochs and dist_utils.any_rank(stop.requested, run.device):
            print_main(f"{stop.reason}: saved epoch {epoch} to {args.output_dir}/checkpoint.pth; --resume it to go on")
            run.tensorboard.close()
            return results
    print_main(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    run.tensorboard.close()
    return results


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run_and_report(train, args)
    except KeyboardInterrupt:
        print_error(UserError(f"stopped by Ctrl-C: nothing saved since the last checkpoint in {args.output_dir or 'no folder'}"))
        return 130
    except Exception as error:  # a bug, or a collective failing because a peer left
        if not dist_utils.is_dist() and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise
        if not first_to_report():
            return 1
        if lost_a_peer(error):
            print(f"error: another process of this run is gone ({one_line(error)})", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        dist_utils.cleanup()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
