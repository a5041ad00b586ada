"""The trainer behind ``python -m cakd.train`` / ``cakd-train``: the released recipes with torchrun, resumable.

It builds a :class:`Run` from the flags, then alternates training, evaluation and
checkpoints. Bad input ends with one line on stderr and exit status 1.
"""
import dataclasses
import datetime
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from . import distributed as dist_utils
from ..weights import save_atomic, stage_text
from ..distillers import BaselineDistiller, StudentWithProjectors, build_distiller, distiller_class
from ..teachers.registry import check_teacher_input
from ..zoo import build_student, build_teacher, no_weights
from .config import distiller_overrides, parse_args, save_config, saved_args
from .checkpoints import LEARNED, UNEVALUATED, Parts, SourceCheckpoint, capture_rng_state, next_position, read, restore_rng
from .data import build_datasets, build_loaders, write_listing_cache
from .engine import EvaluationStopped, TrainingError, evaluate, evaluate_views, train_one_epoch, unlearned_parameters
from .report import UserError, first_to_report, one_line, print_error, run_and_report
from .figures import map_grid
from .logging import TensorBoard, print_main
from .metrics_file import append_metrics, drop_metrics_from, metrics_record, metrics_text, read_metrics
from .optim import ExponentialMovingAverage, build_optimizer, build_scheduler, ema_decay, parameter_groups, scale_lr
from .resume import EPOCH_END_ONLY, refused_change
from .rundir import RunFolder
from .signals import StopRequest
from .spoof_metrics import SpoofScores


class Run:
    """Everything one training run holds: built once, checkpointed and restored as a whole."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.saved = None  # (epoch, step) of the checkpoint this run wrote last
        self.mean_loss = float("nan")  # the last epoch's mean training loss (train_epoch), which :meth:`diverged` checks
        self.unevaluated = None  # a resumed checkpoint's: the training averages of an epoch saved before its evaluation ended
        self.tensorboard = TensorBoard(os.path.join(args.output_dir, "tensorboard") if args.output_dir else None)

        method = distiller_class(args.recipe)
        with_teacher = method.needs_teacher and not args.test_only
        if with_teacher:  # before data, student or teacher
            try:
                check_teacher_input(args.teacher, args.train_crop_size)
            except ValueError as error:
                raise UserError(f"--train-crop-size {args.train_crop_size}: {error}") from None
            try:
                method.check_pair(args.model, args.teacher, args.train_crop_size)
            except ValueError as error:
                raise UserError(str(error)) from None
        train_set, val_set, num_classes = build_datasets(**dataset_options(args))
        self.num_classes = num_classes
        self.datasets = (train_set, val_set)  # their listings go to the dataset cache once the run may write
        self.train_loader, self.val_loader, _ = build_loaders(
            train_set, val_set, num_classes, distributed=args.distributed, **loader_options(args)
        )

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        student = self._student(num_classes)
        teacher = self._teacher(num_classes) if with_teacher else None
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
        distiller.to(self.device, memory_format=self.memory_format)
        self.distiller = distiller
        self.map_images = self._map_images(val_set)
        if not args.test_only:
            self._check_every_parameter_learns()

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
            self.disc_optimizer = torch.optim.SGD(
                distiller.discriminator.parameters(),
                lr=factor * args.lr,
                momentum=args.momentum,
                weight_decay=args.weight_decay,
                nesterov="nesterov" in args.opt.lower(),
            )
            self.disc_lr_scheduler = build_scheduler(self.disc_optimizer, lr_min=factor * args.lr_min, **schedule_options(args))
        self.amp_dtype = amp_dtype(args)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None

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

        # identical weights above; from here each rank draws its own augmentations
        torch.manual_seed(args.seed + args.rank)
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)

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
        """Write the checkpoint of ``epoch`` (``step``: mid-epoch) unless its state diverged;
        rank 0 writes, every rank agrees on the outcome. ``model_{epoch}.pth`` goes first: a
        kill between the two leaves the previous ``checkpoint.pth``, from which ``--resume auto``
        trains this epoch again and writes both. ``unevaluated``: the epoch's training averages,
        for a save at its end whose evaluation a stop cut short (:data:`checkpoints.UNEVALUATED`).
        ``record``: the epoch's ``metrics.jsonl`` line, written to a temporary file before the
        checkpoints and renamed into place after them: a full disk loses neither, or both."""
        state = self.state(epoch, step)
        if unevaluated is not None:
            state[UNEVALUATED] = unevaluated
        where = f"epoch {epoch}" + ("" if step is None else f" step {step}")
        problem = next((p for p in dist_utils.all_gather_object(self.diverged(state)) if p), None)
        if problem:
            kept = os.path.join(self.args.output_dir or ".", "checkpoint.pth")
            restart = (f"start a new run in another --output-dir from its weights (--weights {kept})" if os.path.isfile(kept)
                       else "start again")
            raise TrainingError(
                f"{problem} in {where}: not saved, {self.checkpoint_kept()}; --resume auto would replay the same steps and "
                f"stop here again: {restart} with a lower --lr or with --clip-grad-norm"
                + ("" if problem.startswith("non-finite") else ", or resume with a larger --max-loss-growth if the growth is expected")
            )
        error = None
        if dist_utils.is_main_process() and self.args.output_dir:
            paths = [os.path.join(self.args.output_dir, "checkpoint.pth")]
            # model_{epoch}.pth only on the frequency: at the end checkpoint.pth is the last state, and a
            # second full copy of it (hundreds of MB for a two-epoch quickstart) would keep nothing more
            if step is None and (epoch + 1) % self.args.checkpoint_freq == 0:
                paths.insert(0, os.path.join(self.args.output_dir, f"model_{epoch}.pth"))
            metrics, staged = os.path.join(self.args.output_dir, "metrics.jsonl"), None
            try:
                if record is not None:
                    path = metrics
                    staged = stage_text(metrics, metrics_text(read_metrics(metrics) + [record]))
                for path in paths:
                    save_atomic(state, path)
                if staged is not None:
                    os.replace(staged, metrics)
            except (OSError, RuntimeError) as failure:  # no space left, no permission
                if staged is not None and os.path.exists(staged):
                    os.remove(staged)
                error = (f"could not write {path} ({one_line(failure)}): make room or fix the permissions in "
                         f"{self.args.output_dir}, then rerun with --resume auto; {self.checkpoint_kept()}")
        error = dist_utils.all_gather_object(error)[0]
        if error:
            raise UserError(error)
        self.saved = (epoch, step)

    def diverged(self, state):
        """Why ``state`` must not replace the last checkpoint, or None: non-finite weights,
        buffers or optimizer state (a NaN guard on the loss alone misses them), or an epoch's
        mean training loss ``--max-loss-growth`` times the run's loss scale, ln(classes).

        ln(classes) is the cross-entropy of a uniform guess: where a run starts and what a run
        that learns falls below, so a converged run's batch-to-batch noise never reads as growth,
        and it depends on nothing measured: a resume, from any point, checks against the same
        scale, and the checkpoint needs no entry for it (see the README for why not the first loss)."""
        for key in LEARNED:
            tensors = [t for t in _tensors(state[key]) if t.is_floating_point()]
            if tensors and not all(torch.isfinite(t).all() for t in tensors):
                return f"non-finite values in the {key} state"
        limit, mean, scale = self.args.max_loss_growth, self.mean_loss, math.log(self.num_classes)
        if limit and scale and mean > limit * scale:
            return (f"the training loss diverged: the epoch's mean {mean:.4g} is {mean / scale:.3g} times the run's loss scale "
                    f"ln({self.num_classes}) = {scale:.4g} (--max-loss-growth {limit:g})")
        return None

    def checkpoint_kept(self):
        """Which checkpoint a run that stops now leaves behind, in words."""
        path = os.path.join(self.args.output_dir, "checkpoint.pth") if self.args.output_dir else None
        if path is None or not os.path.isfile(path):
            return "no checkpoint was written yet" + ("" if path else " (no --output-dir)")
        if self.saved is None:
            return f"{path}, from before this run, is kept"
        epoch, step = self.saved
        return f"{path} (epoch {epoch}{'' if step is None else f', step {step}'}) is kept"

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
            self.distiller, self.train_loader, self.optimizer, epoch, self.device, start_step=start_step,
            disc_optimizer=self.disc_optimizer, scaler=self.scaler, amp_dtype=self.amp_dtype, clip_grad_norm=a.clip_grad_norm,
            memory_format=self.memory_format, ema=self.ema, ema_steps=a.model_ema_steps, ema_warmup_epochs=a.lr_warmup_epochs,
            iters_per_epoch=a.iters_per_epoch, print_freq=a.print_freq, tensorboard=self.tensorboard, stop=stop,
            checkpoint_kept=self.checkpoint_kept,
        )
        sampler.start = 0
        return next_step, averages

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


def amp_dtype(args):
    """The autocast dtype of ``--amp --amp-dtype`` (None without ``--amp``)."""
    return getattr(torch, args.amp_dtype) if args.amp else None


def train(args):
    stop = StopRequest()
    if args.test_only:  # nothing to save: SIGTERM just ends it (a handler, so the launcher passes it on)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    else:
        stop.install()  # first: from now on a SIGTERM or a first Ctrl-C saves
    dist_utils.check_device(args.device)
    found = dist_utils.init_distributed_mode(args.device, args.dist_url)
    # onto the namespace, which Run reads: config.yaml and the checkpoint keep world_size and device (a resume checks the first)
    args.distributed, args.rank, args.world_size, args.device = found.distributed, found.rank, found.world_size, str(found.device)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts:
        print_main(f"torchrun restart {restarts} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}")
    folder = RunFolder(args) if args.output_dir and not args.test_only and dist_utils.is_main_process() else None
    try:
        on_output_dir(args, folder and folder.claim)
        return _train(args, stop, folder)
    finally:
        if folder is not None:
            folder.release()


def on_output_dir(args, step):
    """Rank 0 does ``step(args)`` on the run folder (:class:`rundir.RunFolder`; None: nothing, as on
    the other ranks) and returns what it returns there; every rank raises the same refusal."""
    result = error = None
    if step is not None:
        try:
            result = step(args)
        except UserError as refusal:
            error = str(refusal)
        except OSError as failure:
            error = f"cannot use --output-dir {args.output_dir} ({one_line(failure)}): pick a folder this user can write"
    error = dist_utils.all_gather_object(error)[0]
    if error:
        raise UserError(error)
    return result


def check_resume(args):
    """Refuse, before anything is written, a resume whose flags would change the training it
    resumes (:func:`resume.refused_change`): what a run records is what it runs."""
    checkpoint = read(args.resume, mmap=True)
    step = checkpoint.get("step")
    released = dataclasses.asdict(distiller_class(args.recipe).config_class())
    change = refused_change(checkpoint["args"], args, step is not None, released)
    if change is None:
        return
    name, was, now = change
    flag = "the process count (torchrun --nproc_per_node x --nnodes)" if name == "world_size" else "--" + name.replace("_", "-")
    if name in EPOCH_END_ONLY:
        raise UserError(
            f"{args.resume} was saved mid-epoch (step {step}) with {flag} {was}, not {now}: resume it with {flag} {was} "
            "(it may change when a run resumes from an epoch's end)"
        )
    raise UserError(
        f"{args.resume} was trained with {flag} {was}, not {now}: a resume goes on with the flags of the run it resumes; "
        f"resume with {flag} {was} (the run's config.yaml holds them all), or start a new run in another --output-dir"
    )


def _train(args, stop, folder=None):
    if args.use_deterministic_algorithms:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True

    args.resume = resume_path(args)
    if args.resume and not args.test_only:
        check_resume(args)
    run = Run(args)  # data found, teacher file read, crop valid
    if not args.test_only:
        print_main(run.header())
    start_epoch, start_step = args.start_epoch, 0
    if args.resume:
        start_epoch, start_step = run.restore(args.resume)  # the resume accepted
        if not args.test_only and start_epoch >= args.epochs and run.unevaluated is None:
            epochs = f"{args.epochs} epoch{'' if args.epochs == 1 else 's'}"
            print_main(f"{args.resume} is a finished run: all {epochs} trained; nothing to do "
                       "(raise --epochs to train on, or evaluate it with --test-only)")
            return {}
    if not args.test_only:  # the checks passed: from here on the run writes in its folder

        def start(args):
            aside = folder.start(args)
            write_listing_cache(*run.datasets)
            save_config(args, os.path.join(args.output_dir, "config.yaml"))  # what runs
            return aside

        aside = on_output_dir(args, folder and start)
        if aside:
            print_main(f"--start-over: the previous run's files are in {aside}")
    if args.resume:
        print_main(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step}"
                   + (f" (epoch {start_epoch - 1} is evaluated first)" if run.unevaluated is not None else ""))
        if folder is not None and not args.test_only:
            first = start_epoch - 1 if run.unevaluated is not None else start_epoch
            drop_metrics_from(os.path.join(args.output_dir, "metrics.jsonl"), first)
    elif args.test_only and args.weights:
        run.distiller.student.load_state_dict(_student_weights(args.weights))

    if args.test_only:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return run.evaluate()

    print_main("Start training")
    start_time = time.time()
    results = {}
    if run.unevaluated is not None:  # saved while its evaluation was cut short: that evaluation first
        try:
            results = run.evaluate(stop)
        except EvaluationStopped:
            return stopped(run, f"{stop.reason}: epoch {start_epoch - 1} is still unevaluated in {args.resume}; --resume it to go on")
        log_epoch(run, start_epoch - 1, results, run.unevaluated)
        if dist_utils.is_main_process() and args.output_dir:
            append_metrics(os.path.join(args.output_dir, "metrics.jsonl"), metrics_record(start_epoch - 1, results, run.unevaluated))
    for epoch in range(start_epoch, args.epochs):
        next_step, train_stats = run.train_epoch(epoch, start_step, stop)
        start_step = 0
        if next_step is not None:
            run.save(epoch, step=next_step)
            return stopped(run, f"{stop.reason}: saved epoch {epoch} step {next_step} to {args.output_dir}/checkpoint.pth; "
                                "--resume it to go on", results)
        run.lr_scheduler.step()
        if run.disc_lr_scheduler is not None:
            run.disc_lr_scheduler.step()
        try:
            results = run.evaluate(stop)
        except EvaluationStopped as cut:
            run.save(epoch, unevaluated=train_stats)
            return stopped(run, f"{stop.reason}: evaluation {cut}; saved epoch {epoch} to {args.output_dir}/checkpoint.pth; "
                                "--resume it to go on (it evaluates the epoch first)")
        log_epoch(run, epoch, results, train_stats)
        run.save(epoch, record=metrics_record(epoch, results, train_stats))  # no line for an epoch not saved
        if epoch + 1 < args.epochs and dist_utils.any_rank(stop.requested, run.device):
            return stopped(run, f"{stop.reason}: saved epoch {epoch} to {args.output_dir}/checkpoint.pth; --resume it to go on",
                           results)
    print_main(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    run.tensorboard.close()
    return results


def log_epoch(run, epoch, results, train_stats):
    """An evaluated epoch's attention maps and scalars to TensorBoard."""
    run.log_attention_maps(epoch)
    run.tensorboard.scalars(results, epoch, prefix="val/")
    run.tensorboard.scalars(train_stats, epoch, prefix="train_epoch/")
    run.tensorboard.flush()


def stopped(run, line, results=None):
    """End the run after a stop request: say what was saved, close TensorBoard."""
    print_main(line)
    run.tensorboard.close()
    return results or {}


def _tensors(obj):
    """The tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def resume_path(args):
    """``--resume auto``: OUTPUT_DIR/checkpoint.pth when rank 0 sees it, else a fresh start."""
    if args.resume != "auto":
        return args.resume
    if args.start_over:  # the run that is there goes aside (RunFolder.start)
        return ""
    path = os.path.join(args.output_dir or ".", "checkpoint.pth")
    found = dist_utils.all_gather_object(os.path.isfile(path))[0]  # every rank takes rank 0's answer
    if found:
        return path
    if args.test_only:
        raise UserError(f"--resume auto: there is no {path} to evaluate")
    print_main(f"--resume auto: no {path} yet, starting fresh")
    return ""


def _student_weights(path):
    """A student state dict from an exported file, a cakd checkpoint or a released-code one."""
    return SourceCheckpoint(path).student_state("student")


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # train() takes them over
    try:
        return run_and_report(train, args)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves), or one where nothing is saved
        print_error(UserError(f"stopped by Ctrl-C: nothing saved since the last checkpoint in {args.output_dir or 'no folder'}"))
        return 130
    except Exception as error:  # not bad input: a bug, or a collective failing because a peer left
        if not dist_utils.is_dist() and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise
        if not first_to_report():  # a peer failed first and said why; this is the echo
            return 1
        if lost_a_peer(error):
            print(f"error: another process of this run is gone ({one_line(error)})", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        dist_utils.cleanup()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def lost_a_peer(error):
    """Whether ``error`` is a collective failing because another rank left (gloo, NCCL, the store)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        needle in text for needle in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL")
    )


if __name__ == "__main__":
    sys.exit(main())
