"""Building a classification run: data, student, teacher and distiller, optimizers, the
wrappers (DDP, compile, EMA), each a named step of :class:`Run`, and what a run does between the
trainer's decisions (an epoch, an evaluation, a checkpoint, a restore). The loop that decides is
:mod:`.trainer`."""
import os
import random
import sys

import numpy as np
import torch
from torch.nn import functional as F

from . import distributed as dist_utils
from ..distillers import BaselineDistiller, StudentWithProjectors, build_distiller, distiller_class
from ..teachers.registry import check_teacher_input
from ..zoo import build_student, build_teacher, no_weights
from .config import amp_dtype, distiller_overrides, saved_args
from .checkpoints import LEARNED, UNEVALUATED, Parts, capture_rng_state, next_position, read, restore_rng
from .data import build_datasets, build_loaders
from .engine import EpochOptions, evaluate, evaluate_views, train_one_epoch, unlearned_parameters
from .report import UserError
from .figures import map_grid
from .logging import TensorBoard, print_main
from .optim import ExponentialMovingAverage, build_optimizer, build_scheduler, ema_decay, parameter_groups, scale_lr
from .saving import CheckpointWriter, loss_divergence, nonfinite_part
from .spoof_metrics import SpoofScores


class Run:
    """Everything one training run holds: built once, checkpointed and restored as a whole."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.checkpoints = CheckpointWriter(args.output_dir, args.checkpoint_freq)
        self.mean_loss = float("nan")  # the last epoch's mean training loss (train_epoch), which :meth:`diverged` checks
        self.unevaluated = None  # a resumed checkpoint's: the training averages of an epoch saved before its evaluation ended
        self.tensorboard = TensorBoard(os.path.join(args.output_dir, "tensorboard") if args.output_dir else None)

        method = distiller_class(args.recipe)
        with_teacher = method.needs_teacher and not args.test_only
        if with_teacher:  # before data, student or teacher
            self._check_pair(method)
        val_set = self._data()
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.distiller = self._distiller(with_teacher)
        self.map_images = self._map_images(val_set)
        if not args.test_only:
            self._check_every_parameter_learns()
        self._optimizers()
        self._wrap()
        # identical weights above; from here each rank draws its own augmentations
        torch.manual_seed(args.seed + args.rank)
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)

    def _check_pair(self, method):
        """Refuse, before anything is built, a crop the teacher cannot take or a pair the recipe cannot distil."""
        args = self.args
        try:
            check_teacher_input(args.teacher, args.train_crop_size)
        except ValueError as error:
            raise UserError(f"--train-crop-size {args.train_crop_size}: {error}") from None
        try:
            method.check_pair(args.model, args.teacher, args.train_crop_size)
        except ValueError as error:
            raise UserError(str(error)) from None

    def _data(self):
        """Data sets and loaders; returns the validation set."""
        args = self.args
        train_set, val_set, self.num_classes = build_datasets(**dataset_options(args))
        self.datasets = (train_set, val_set)  # their listings go to the dataset cache once the run may write
        self.train_loader, self.val_loader, _ = build_loaders(
            train_set, val_set, self.num_classes, distributed=args.distributed, **loader_options(args)
        )
        return val_set

    def _distiller(self, with_teacher):
        """Student, teacher and the recipe's distiller around them, on the device (``--test-only``: the student alone)."""
        args = self.args
        student = self._student(self.num_classes)
        teacher = self._teacher(self.num_classes) if with_teacher else None
        if args.test_only:
            distiller = BaselineDistiller(StudentWithProjectors(student))
        else:
            try:
                distiller = build_distiller(
                    args.recipe, student, teacher, image_size=args.train_crop_size, **distiller_overrides(args)
                )
            except ValueError as error:
                raise UserError(str(error)) from None
        if args.distributed and args.sync_bn:
            distiller.trainable.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(distiller.trainable.student)
        return distiller.to(self.device, memory_format=self.memory_format)

    def _optimizers(self):
        """The student's optimizer and schedule, the discriminator's (always SGD, as released), the AMP scaler."""
        args, distiller = self.args, self.distiller
        groups = parameter_groups(
            distiller.trainable,
            args.weight_decay,
            norm_weight_decay=args.norm_weight_decay,
            bias_weight_decay=args.bias_weight_decay,
            embedding_decay=args.transformer_embedding_decay,
        )
        groups = scale_lr(groups, distiller.lr_factors(), args.lr)
        self.optimizer = build_optimizer(groups, args.opt, args.lr, args.momentum, args.weight_decay)
        try:
            self.lr_scheduler = build_scheduler(self.optimizer, lr_min=args.lr_min, **schedule_options(args))
        except ValueError as error:
            raise UserError(str(error)) from None
        self.disc_optimizer = self.disc_lr_scheduler = None
        if distiller.discriminator is not None:
            factor = distiller.disc_lr_factor()
            sgd = "sgd_nesterov" if "nesterov" in args.opt.lower() else "sgd"
            self.disc_optimizer = build_optimizer(distiller.discriminator.parameters(), sgd, factor * args.lr, args.momentum,
                                                  args.weight_decay)
            self.disc_lr_scheduler = build_scheduler(self.disc_optimizer, lr_min=factor * args.lr_min, **schedule_options(args))
        self.amp_dtype = amp_dtype(args)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def _wrap(self):
        """DDP around the trainable part (never the teacher), ``torch.compile``, the EMA copy."""
        args, distiller = self.args, self.distiller
        if args.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(distiller.trainable, device_ids=ids)
            distiller.set_student_runner(self.ddp)
        if args.compile:
            distiller.compile()
        self.ema = None
        if args.model_ema:
            decay = ema_decay(args.model_ema_decay, args.model_ema_steps, args.batch_size, args.world_size, args.epochs)
            self.ema = ExponentialMovingAverage(distiller.student, decay, self.device)

    def _map_images(self, val_set, count=4):
        """The first validation images, at the training crop, whose attention maps go to
        TensorBoard after each evaluation (rank 0, a run with an attention projector)."""
        if self.tensorboard.log_dir is None or getattr(self.distiller.trainable, "pca_proj", None) is None:
            return None
        images = torch.stack([val_set[i][0] for i in range(min(count, len(val_set)))])
        size = self.args.train_crop_size
        if images.shape[-1] != size:  # the distiller's grid is the training crop's
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images.to(self.device, memory_format=self.memory_format)

    def log_attention_maps(self, epoch):
        """Teacher | student | |difference| maps of :meth:`_map_images` to TensorBoard, the student
        in eval mode: a researcher watches its maps approach the teacher's."""
        if self.map_images is not None:
            self.distiller.eval()
            teacher, student = self.distiller.attention_maps(self.map_images)
            self.tensorboard.image("attention/teacher|student|difference", map_grid(teacher.cpu(), student.cpu(), cell=128), epoch)

    def _check_every_parameter_learns(self):
        """Refuse loss switches that leave a trainable parameter without a gradient: DDP would
        fail a step later, and a single process would train a student with a random part."""
        names = unlearned_parameters(self.distiller, self.args.train_crop_size, self.device, self.memory_format)
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise UserError(
                f"with these loss switches {shown} never get a gradient: turn on a loss term that uses them "
                "(use_cls or use_logits for the classifier, use_token for the token projector)"
            )

    def _student(self, num_classes):
        """The student, randomly initialised or (training with ``--weights``) from weights."""
        args = self.args
        weights = None if args.test_only else args.weights  # --test-only reads --weights later, as any checkpoint
        try:
            student = build_student(args.model, num_classes, weights=weights, image_size=args.train_crop_size)
        except (ValueError, RuntimeError, FileNotFoundError) as error:
            raise UserError(str(error)) from None
        if not no_weights(weights):
            print_main(f"student {args.model} initialised from {weights} (a classifier of another class count starts afresh)")
        return student

    def _teacher(self, num_classes):
        args = self.args
        random_teacher = no_weights(args.teacher_weights)
        if random_teacher:
            print_main("warning: --teacher-weights none: a random teacher, for smoke runs only", file=sys.stderr)
        try:
            return build_teacher(
                args.teacher,
                args.teacher_weights,
                image_size=args.train_crop_size,
                num_classes=num_classes if random_teacher else None,
            )
        except (ValueError, RuntimeError, FileNotFoundError) as error:
            raise UserError(str(error)) from None

    # ---- checkpoints -------------------------------------------------------------
    def parts(self):
        """What a checkpoint saves of this run (:class:`checkpoints.Parts`)."""
        return Parts(self.distiller, self.optimizer, self.lr_scheduler, self.disc_optimizer, self.disc_lr_scheduler,
                     self.scaler, self.ema)

    def state(self, epoch, step=None):
        """The checkpoint dict. Collective: every rank must call it (RNG states are gathered)."""
        return self.parts().state_dict(epoch, step, saved_args(self.args), dist_utils.all_gather_object(capture_rng_state()))

    def save(self, epoch, step=None, unevaluated=None, record=None):
        """Write the checkpoint of ``epoch`` (``step``: mid-epoch) unless its state diverged
        (:class:`saving.CheckpointWriter`). ``unevaluated``: the epoch's training averages, for a
        save at its end whose evaluation a stop cut short (:data:`checkpoints.UNEVALUATED`);
        ``record``: the epoch's ``metrics.jsonl`` line. Collective."""
        state = self.state(epoch, step)
        if unevaluated is not None:
            state[UNEVALUATED] = unevaluated
        self.checkpoints.refuse(self.diverged(state), epoch, step)
        self.checkpoints.write(state, epoch, step, record)

    def diverged(self, state):
        """Why ``state`` must not replace the last checkpoint, or None (:mod:`saving`)."""
        return nonfinite_part(state, LEARNED) or loss_divergence(self.mean_loss, self.num_classes, self.args.max_loss_growth)

    def restore(self, path):
        """Load a checkpoint; returns (first epoch, first step) to run."""
        ckpt = read(path)
        saved = ckpt["args"]
        for key in ("recipe", "model", "teacher"):
            if key in saved and saved[key] != getattr(self.args, key):
                raise UserError(f"{path} was trained with --{key} {saved[key]}, not {getattr(self.args, key)}")
        self.parts().load(ckpt, path, test_only=self.args.test_only)
        if self.args.test_only:
            return ckpt["epoch"], 0
        self.unevaluated = ckpt.get(UNEVALUATED)
        written = restore_rng(ckpt, self.args.rank, self.args.world_size)
        if written != self.args.world_size:
            print_main(f"note: {path} was written by {written} processes, not {self.args.world_size}: RNG streams restart")
        return next_position(ckpt)

    def header(self):
        """What this run is: recipe, pair, batch, epochs, and when lambda is non-zero."""
        a = self.args
        pair = f"{a.model} <- {a.teacher} ({a.teacher_weights})" if self.distiller.teacher is not None else f"{a.model} alone"
        line = (f"cakd.train: {a.recipe} recipe, {pair}, {a.world_size} process(es) x {a.batch_size} images = "
                f"{a.world_size * a.batch_size} per step, {a.epochs} epoch{'' if a.epochs == 1 else 's'}")
        for note in (self.distiller.schedule_line(a.epochs), self.distiller.batch_line(a.batch_size)):
            if note:
                line += "\n  " + note
        return line

    # ---- training and evaluation -----------------------------------------------------
    def train_epoch(self, epoch, start_step, stop):
        """Epoch ``epoch`` from ``start_step`` (:func:`engine.train_one_epoch`) until its end or
        ``stop``; returns ``(next step or None, averages)`` and keeps the losses :meth:`diverged` checks."""
        a, sampler = self.args, self.train_loader.sampler  # seeds.SeededSampler
        sampler.set_epoch(epoch)
        sampler.start = start_step * a.batch_size  # a mid-epoch resume: what was trained is left out
        next_step, averages, self.mean_loss = train_one_epoch(
            self.distiller, self.train_loader, self.optimizer, epoch, self.device, self.epoch_options(stop), start_step
        )
        sampler.start = 0
        return next_step, averages

    def epoch_options(self, stop):
        """The epoch loop's :class:`engine.EpochOptions` for this run."""
        a = self.args
        return EpochOptions(
            disc_optimizer=self.disc_optimizer, scaler=self.scaler, amp_dtype=self.amp_dtype, clip_grad_norm=a.clip_grad_norm,
            memory_format=self.memory_format, ema=self.ema, ema_steps=a.model_ema_steps, ema_warmup_epochs=a.lr_warmup_epochs,
            iters_per_epoch=a.iters_per_epoch, print_freq=a.print_freq, tensorboard=self.tensorboard, stop=stop,
            checkpoint_kept=self.checkpoints.kept,
        )

    def evaluate(self, stop=None):
        """Top-1/top-5 of the student (and its EMA) on the validation set, each with rank 0's
        BatchNorm statistics (:meth:`log_attention_maps` draws the maps afterwards). ``stop``:
        a :class:`signals.StopRequest` that cuts the passes short (:class:`engine.EvaluationStopped`)."""
        for module in (self.distiller.student, self.ema.module if self.ema is not None else None):
            if module is not None:
                dist_utils.broadcast_buffers(module)  # evaluate the copy the checkpoint keeps (rank 0's)
        options = dict(amp_dtype=self.amp_dtype, memory_format=self.memory_format, print_freq=max(self.args.print_freq, 1) * 10,
                       stop=stop)
        results = {}
        if self.args.eval_views:  # clean and each view, in one pass (views seeded with 0)
            options["protocol"] = self.args.eval_views_protocol
            results.update(evaluate_views(self.distiller.student, self.val_loader, self.device, header="Test:", **options))
            if self.ema is not None:
                ema = evaluate_views(self.ema.module, self.val_loader, self.device, header="Test: EMA", **options)
                results.update({"ema_" + key: value for key, value in ema.items()})
            return results
        spoof = SpoofScores() if self.num_classes == 2 else None  # live / spoof: also the EER and its kin
        results["acc1"], results["acc5"] = evaluate(self.distiller.student, self.val_loader, self.device, header="Test:",
                                                    scores=spoof, **options)
        if spoof is not None:
            results.update(spoof.compute("Test:"))
        if self.ema is not None:
            spoof = SpoofScores() if self.num_classes == 2 else None
            results["ema_acc1"], results["ema_acc5"] = evaluate(
                self.ema.module, self.val_loader, self.device, header="Test: EMA", scores=spoof, **options
            )
            if spoof is not None:
                results.update({"ema_" + key: value for key, value in spoof.compute("Test: EMA").items()})
        return results


def flag_values(args, *names):
    """``{name: args.name}``: flags passed on as the keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}


def dataset_options(args):
    """The data flags, as :func:`build_datasets` takes them."""
    names = ("dataset", "data_path", "train_crop_size", "val_crop_size", "val_resize_size", "interpolation", "auto_augment",
             "ra_magnitude", "augmix_severity", "random_erase", "num_classes", "synthetic_size", "download")
    return {**flag_values(args, *names), "cache_dir": args.output_dir if args.cache_dataset else None}


def loader_options(args):
    """The loader flags, as :func:`build_loaders` takes them (``distributed`` aside: torchrun's, not a flag)."""
    return flag_values(args, "batch_size", "workers", "seed", "ra_sampler", "ra_reps", "mixup_alpha", "cutmix_alpha")


def schedule_options(args):
    """The learning-rate schedule's flags, as :func:`build_scheduler` takes them."""
    return dict(
        name=args.lr_scheduler,
        epochs=args.epochs,
        step_size=args.lr_step_size,
        milestones=args.lr_milestones,
        gamma=args.lr_gamma,
        warmup_epochs=args.lr_warmup_epochs,
        warmup_method=args.lr_warmup_method,
        warmup_decay=args.lr_warmup_decay,
    )
