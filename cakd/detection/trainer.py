"""The trainer behind ``python -m cakd.detection``: torchvision's detection recipe on cakd.train's
run machinery (run-folder lock, atomic checkpoints, exact ``--resume auto``, SIGTERM saving under
the launcher, one-line errors, ``config.yaml``, ``metrics.jsonl``, TensorBoard)."""
import datetime
import os
import random
import time

import numpy as np
import torch

from ..train import distributed as dist_utils
from ..train import process
from ..train.checkpoints import CheckpointError, capture_rng_state, next_position, read, restore_rng
from ..train.config import save_config, saved_args
from ..train.data import DataError
from ..train.report import UserError, one_line
from ..train.logging import TensorBoard, print_main
from ..train.metrics_file import drop_metrics_from, metrics_record
from ..train.optim import build_optimizer, parameter_groups
from ..train.resume import check_resume, resume_path
from ..train.rundir import on_output_dir
from ..train.saving import CheckpointWriter, nonfinite_part
from ..train.config import amp_dtype
from .config import parse_args
from .data import build_loaders, coco_dataset, need_pycocotools
from .engine import LrFactor, evaluate, train_one_epoch
from .models import build_detector, initialise


class Run:
    """One detection run: data, detector, optimizer and schedule, checkpointed and restored as a whole."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.checkpoints = CheckpointWriter(args.output_dir, args.checkpoint_freq)
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

    def save(self, epoch, step=None, record=None):
        """Write the checkpoint (:class:`cakd.train.saving.CheckpointWriter`) unless its state holds
        a non-finite value. Collective."""
        state = self.state(epoch, step)
        self.checkpoints.refuse(nonfinite_part(state, ("model", "optimizer")), epoch, step)
        self.checkpoints.write(state, epoch, step, record)

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
            print_freq=a.print_freq, tensorboard=self.tensorboard, stop=stop, checkpoint_kept=self.checkpoints.kept,
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


def train(args):
    need_pycocotools()
    if args.test_only and not args.resume:
        raise UserError("--test-only evaluates a checkpoint: pass it with --resume PATH (or --resume auto)")
    stop = process.start(args)
    with process.run_folder(args) as folder:
        return _train(args, stop, folder)


def _train(args, stop, folder=None):
    args.resume = resume_path(args)
    if args.resume and not args.test_only:
        check_resume(args)
    run = Run(args)  # data found, backbone weights fit
    start_epoch, start_step = args.start_epoch, 0
    if args.resume:
        start_epoch, start_step = run.restore(args.resume)  # the resume accepted
    if args.test_only:
        return run.evaluate()
    if args.resume and start_epoch >= args.epochs:
        print_main(f"{args.resume} is a finished run: all {args.epochs} epochs trained; nothing to do")
        return {}

    def start(args):  # the checks passed: from here on the run writes in its folder
        aside = folder.start(args)
        save_config(args, os.path.join(args.output_dir, "config.yaml"))  # what runs
        return aside

    aside = on_output_dir(args, folder and start)
    if aside:
        print_main(f"--start-over: the previous run's files are in {aside}")
    print_main(run.header())
    if args.resume:
        print_main(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step}")
        if folder is not None:
            drop_metrics_from(os.path.join(args.output_dir, "metrics.jsonl"), start_epoch)
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
        run.save(epoch, record=metrics_record(epoch, results, train_stats))  # no line for an epoch not saved
        if epoch + 1 < args.epochs and dist_utils.any_rank(stop.requested, run.device):
            print_main(f"{stop.reason}: saved epoch {epoch} to {args.output_dir}/checkpoint.pth; --resume it to go on")
            run.tensorboard.close()
            return results
    print_main(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    run.tensorboard.close()
    return results


def main(argv=None):
    return process.main(train, parse_args(argv))
