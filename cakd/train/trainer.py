"""The trainer behind ``python -m cakd.train`` / ``cakd-train``: the released recipes with
torchrun, resumable. It decides what a run does, epoch by epoch: train, evaluate, save, or
stop and say why. What a run is and how it is built is :mod:`.run`; the process around it
(signals, torchrun, the run folder, the one catch) is :mod:`.process`; the resume policy is
:mod:`.resume`; writing checkpoints is :mod:`.saving`. Bad input ends with one line on stderr
and exit status 1.
"""
import dataclasses
import datetime
import os
import sys
import time

import torch

from . import distributed as dist_utils
from . import process
from ..distillers import distiller_class
from .checkpoints import SourceCheckpoint
from .config import parse_args, save_config
from .data import write_listing_cache
from .engine import EvaluationStopped
from .logging import print_main
from .metrics_file import append_metrics, drop_metrics_from, metrics_record
from .resume import check_resume, resume_path
from .run import Run
from .rundir import on_output_dir


def train(args):
    stop = process.start(args)
    with process.run_folder(args) as folder:
        return _train(args, stop, folder)


def _train(args, stop, folder=None):
    if args.use_deterministic_algorithms:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True

    args.resume = resume_path(args)
    if args.resume and not args.test_only:
        check_resume(args, released=dataclasses.asdict(distiller_class(args.recipe).config_class()))
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
    if args.test_only:
        if not args.resume and args.weights:
            run.distiller.student.load_state_dict(_student_weights(args.weights))
        elif args.resume:
            print_main(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step}")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return run.evaluate()
    start_writing(run, folder, start_epoch, start_step)
    return train_epochs(run, stop, start_epoch, start_step)


def start_writing(run, folder, start_epoch, start_step):
    """The run's checks passed: from here on it writes in its folder (:class:`rundir.RunFolder`:
    the lock, a previous run moved aside, the dataset cache, ``config.yaml``); a resume forgets
    the ``metrics.jsonl`` lines of the epochs it trains again."""
    args = run.args

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
        if folder is not None:
            first = start_epoch - 1 if run.unevaluated is not None else start_epoch
            drop_metrics_from(os.path.join(args.output_dir, "metrics.jsonl"), first)


def train_epochs(run, stop, start_epoch, start_step):
    """The epoch loop: train, step the schedules, evaluate, save, until the last epoch or a stop
    (saved mid-epoch, or at an epoch's end, its evaluation cut short or done)."""
    args = run.args
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


def _student_weights(path):
    """A student state dict from an exported file, a cakd checkpoint or a released-code one."""
    return SourceCheckpoint(path).student_state("student")


def main(argv=None):
    return process.main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
