"""A picture of attention maps for a few validation images: each image beside the teacher's
q k^T score map, the student's projected map (what the attention term pulls towards it) and
their absolute difference.

    python scripts/attention_maps.py --checkpoint runs/cakd/checkpoint.pth --output attention.png

Rows are images of DATA/val (eval resize, center crop to the training crop), ``--num-images`` of
them from as many classes as there are (the first image of each class, then the second, ...). Each map is N x N (N tokens: 196 for ViT-B/16 at 224), query tokens down, key tokens
across: the head mean of the pre-softmax scores of the teacher's last block, and of the
student's attention projector (released or paper form, unswapped). Teacher and student of one
row share one colour scale, the difference has its own; each has its colour bar. The
distiller is rebuilt from the checkpoint's whole saved configuration (any pair, released or
paper forms, every ablation with an attention projector); a random teacher (``--teacher-weights
none``) is drawn again from the run's seed, as the trainer drew it. Both models run in eval
mode; ``--batch-stats`` runs the student's BatchNorm on the images' own statistics instead, as a
training step does, for runs too short for the running averages to settle. Needs matplotlib
(``pip install -e ".[plots]"``).
"""
import argparse
import itertools
import os
import sys

import torch

from cakd.students import IMAGENET_MEAN, IMAGENET_STD
from cakd.train.checkpoints import SourceCheckpoint
from cakd.train.config import HelpFormatter
from cakd.train.report import UserError, run_and_report
from cakd.train.figures import pyplot, save
from cakd.train.distributed import check_device
from cakd.train.scriptkit import add_shared_flags, rebuild_distiller, training_crop_val_dataset


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Picture of teacher | student | |difference| attention maps of a cakd checkpoint",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    add_shared_flags(
        p, "checkpoint", "data_path", "model", "teacher", "teacher_weights", "device", required=("checkpoint",),
        checkpoint="a training checkpoint (checkpoint.pth, model_N.pth) of the cakd recipe, or a released cakd checkpoint",
    )
    p.add_argument("--output", default="attention_maps.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--num-images", default=4, type=int, help="rows: N validation images, from as many classes as there are (default: %(default)s)")
    p.add_argument("--val-resize-size", default=None, type=int, help="eval resize (default: the run's)")
    p.add_argument(
        "--batch-stats",
        action="store_true",
        help="student BatchNorm on the shown images' own statistics, as in a training step: for runs too short "
        "for the running averages to settle (the quickstart), whose eval-mode maps are far off (default: off)",
    )
    return p


def pick_rows(targets, count):
    """Indices of ``count`` images from as many classes as there are: the first image of each
    class in turn, then the second, ... (the first N images of a folder are often one class)."""
    by_class = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    turns = itertools.zip_longest(*by_class.values())
    return [index for turn in turns for index in turn if index is not None][:count]


def figure(images, teacher_maps, student_maps, names, caption):
    """The grid: one row per image, columns image | teacher | student | |difference|, with
    ``caption`` (the models and the student's BatchNorm mode) above it."""
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 4, figsize=(12, 2.8 * rows + 0.4), squeeze=False, layout="constrained")
    fig.suptitle(caption, fontsize="small")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tokens = teacher_maps.shape[-1]
    for row, (image, t, s, name) in enumerate(zip(images, teacher_maps, student_maps, names)):
        lo, hi = min(t.min(), s.min()).item(), max(t.max(), s.max()).item()
        diff = (t - s).abs()
        axes[row, 0].imshow((image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        axes[row, 0].set_ylabel(name, fontsize="small")
        shown = axes[row, 1].imshow(t.numpy(), vmin=lo, vmax=hi, cmap="viridis")
        axes[row, 2].imshow(s.numpy(), vmin=lo, vmax=hi, cmap="viridis")
        fig.colorbar(shown, ax=axes[row, 1:3].tolist(), fraction=0.025, pad=0.02)
        shown = axes[row, 3].imshow(diff.numpy(), vmin=0, vmax=diff.max().item(), cmap="magma")
        fig.colorbar(shown, ax=axes[row, 3], fraction=0.046, pad=0.04)
        axes[row, 3].set_xlabel(f"MSE {(diff ** 2).mean().item():.4g}", fontsize="small")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    grid = round(tokens**0.5)
    titles = ("image", f"teacher q k^T ({tokens} tokens, a {grid}x{grid} grid)", "student, projected", "|teacher - student|")
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
    return fig


@torch.no_grad()
def run(args):
    if args.num_images < 1:
        raise UserError("--num-images must be at least 1")
    device = check_device(args.device)
    checkpoint = SourceCheckpoint(args.checkpoint)
    if checkpoint.kind == "student":
        raise UserError(f"{args.checkpoint} is a plain student state dict: it holds no projectors, so no attention map to draw")
    if checkpoint.recipe() != "cakd":
        raise UserError(f"{args.checkpoint} was trained with the {checkpoint.recipe()} recipe: it has no attention projector, so no map to draw")
    distiller, teacher = rebuild_distiller(checkpoint, model=args.model, teacher=args.teacher, teacher_weights=args.teacher_weights)
    if distiller.trainable.pca_proj is None:
        raise UserError(f"{args.checkpoint} was trained without the attention projector (use_pca: false): no map to draw")
    dataset = training_crop_val_dataset(checkpoint, distiller.student, args.data_path, args.val_resize_size)
    distiller.to(device)

    rows = pick_rows(dataset.targets, args.num_images)
    count = len(rows)
    images = torch.stack([dataset[i][0] for i in rows])
    distiller.trainable.train(args.batch_stats)  # running statistics are not saved: no harm done
    teacher_maps, student_maps = (maps.float().cpu() for maps in distiller.attention_maps(images.to(device)))
    distiller.close()
    names = [os.path.relpath(dataset.samples[i][0], dataset.root) for i in rows]
    norm = "batch statistics of these images (--batch-stats)" if args.batch_stats else "running statistics (eval mode)"
    caption = f"teacher {teacher}; student with BatchNorm on {norm}"
    fig = figure(images, teacher_maps, student_maps, names, caption)
    width, height = (round(v * 100) for v in fig.get_size_inches())
    save(fig, args.output)

    print(f"teacher {teacher}, student of {args.checkpoint} with BatchNorm on {norm}")
    print(f"maps {teacher_maps.shape[-1]}x{teacher_maps.shape[-1]} (query token down, key token across)")
    for name, t, s in zip(names, teacher_maps, student_maps):
        lo, hi = min(t.min(), s.min()).item(), max(t.max(), s.max()).item()
        print(f"{name}: teacher|student scale {lo:.3g}..{hi:.3g}, |difference| up to {(t - s).abs().max().item():.3g}, "
              f"MSE {((t - s) ** 2).mean().item():.4g}")
    print(f"wrote {args.output} ({width}x{height} px, {count} rows: image | teacher | student | |difference|)")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
