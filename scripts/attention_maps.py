"""A PNG grid of attention maps for a few validation images: the teacher's q k^T map, the
student's projected map (what L_pca pulls towards it), and their absolute difference.

    python scripts/attention_maps.py --checkpoint runs/quickstart/checkpoint.pth --output attention.png

Rows are images (the first ``--num-images`` of DATA/val, eval preset), columns are
teacher | student | |teacher - student|. Each map is N x N (N tokens: 196 for ViT-B/16 at 224),
query tokens down, key tokens across, blown up to ``--cell`` pixels with nearest-neighbour.
Teacher and student of one image share one colour scale (their joint min..max); the difference
has its own, 0..max. The scales and the per-image MSE are printed, since the picture has no text.
Both models run in eval mode; ``--batch-stats`` runs the student's BatchNorm on the images' own
statistics instead, as a training step does, for runs too short for the running averages to settle.
With ``--teacher-weights none`` the run's random teacher is drawn again from its seed, as the
trainer drew it (exact when the eval crop equals the training crop).
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a clone without pip install

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from cakd.models import num_classes_of  # noqa: E402
from cakd.train.tools import (  # noqa: E402
    SourceCheckpoint,
    UserError,
    build_val_dataset,
    check_class_count,
    pick,
    rebuild_distiller,
    run_and_report,
)

# colour ramps as (position, RGB) anchors, interpolated linearly
MAP_RAMP = [(0.0, (13, 8, 135)), (0.35, (156, 23, 158)), (0.65, (237, 121, 83)), (1.0, (240, 249, 33))]
DIFF_RAMP = [(0.0, (0, 0, 0)), (0.4, (170, 20, 20)), (0.75, (250, 170, 30)), (1.0, (255, 255, 230))]
BACKGROUND = 255


def get_args_parser():
    p = argparse.ArgumentParser(description="PNG grid of teacher | student | |difference| attention maps of a cakd checkpoint")
    p.add_argument("--checkpoint", required=True, help="a cakd-recipe checkpoint.pth / model_N.pth, or a released cakd checkpoint")
    p.add_argument("--output", default="attention_maps.png", help="the PNG to write (default: attention_maps.png)")
    p.add_argument("--data-path", default=None, help="folder with val/<class>/ or the val folder itself (default: the run's)")
    p.add_argument("--num-images", default=4, type=int, help="rows: the first N validation images (default: 4)")
    p.add_argument("--cell", default=None, type=int, help="pixels a side of each map (default: the smallest multiple of N >= 160)")
    p.add_argument("--pad", default=4, type=int, help="pixels between and around the cells (default: 4)")
    p.add_argument("--teacher", default=None, help="teacher architecture (default: the run's, else vit_b_16)")
    p.add_argument("--teacher-weights", default=None, help="IMAGENET1K_V1, a .pth, or none (default: the run's)")
    p.add_argument("--model", "--student", dest="model", default=None, help="student architecture (default: the run's)")
    p.add_argument("--val-resize-size", default=None, type=int, help="eval resize (default: the run's)")
    p.add_argument(
        "--batch-stats",
        action="store_true",
        help="student BatchNorm on the shown images' own statistics, as in a training step: for runs too short "
        "for the running averages to settle (the quickstart), whose eval-mode maps are far off",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return p


def grid_size(num_images, cell, pad, columns=3):
    """(H, W) of the picture: cells with ``pad`` pixels between them and around the edge."""
    return num_images * cell + (num_images + 1) * pad, columns * cell + (columns + 1) * pad


def colorize(values, ramp):
    """Values in [0, 1], shape (H, W), to a (3, H, W) uint8 image along ``ramp``."""
    positions = torch.tensor([p for p, _ in ramp])
    colours = torch.tensor([c for _, c in ramp], dtype=torch.float32)
    values = values.clamp(0, 1)
    upper = torch.searchsorted(positions, values.contiguous(), right=False).clamp(1, len(ramp) - 1)
    lower = upper - 1
    t = ((values - positions[lower]) / (positions[upper] - positions[lower])).unsqueeze(-1)
    rgb = colours[lower] * (1 - t) + colours[upper] * t
    return rgb.round().to(torch.uint8).permute(2, 0, 1)


def scaled(values, lo, hi):
    return (values - lo) / (hi - lo) if hi > lo else torch.zeros_like(values)


def render(teacher_maps, student_maps, cell, pad):
    """The grid: one row per image, columns teacher | student | |difference|."""
    rows = teacher_maps.shape[0]
    height, width = grid_size(rows, cell, pad)
    canvas = torch.full((3, height, width), BACKGROUND, dtype=torch.uint8)
    scales = []
    for i, (t, s) in enumerate(zip(teacher_maps, student_maps)):
        lo, hi = min(t.min(), s.min()).item(), max(t.max(), s.max()).item()
        diff = (t - s).abs()
        top = diff.max().item()
        cells = [
            colorize(scaled(t, lo, hi), MAP_RAMP),
            colorize(scaled(s, lo, hi), MAP_RAMP),
            colorize(scaled(diff, 0, top), DIFF_RAMP),
        ]
        y = pad + i * (cell + pad)
        for j, image in enumerate(cells):
            x = pad + j * (cell + pad)
            blown_up = F.interpolate(image[None].float(), size=(cell, cell), mode="nearest")[0]
            canvas[:, y : y + cell, x : x + cell] = blown_up.to(torch.uint8)
        scales.append((lo, hi, top, (diff**2).mean().item()))
    return canvas, scales


def write_png(image, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():  # torchvision 0.29 marks its PNG encoder deprecated in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        torchvision.io.write_png(image, path)


@torch.no_grad()
def run(args):
    if args.num_images < 1:
        raise UserError("--num-images must be at least 1")
    checkpoint = SourceCheckpoint(args.checkpoint)
    if checkpoint.kind == "student":
        raise UserError(f"{args.checkpoint} is a plain student state dict: it holds no projectors, so no attention map to draw")
    if checkpoint.recipe() != "cakd":
        raise UserError(f"{args.checkpoint} was trained with the {checkpoint.recipe()} recipe: it has no attention projector, so no map to draw")
    distiller, teacher = rebuild_distiller(checkpoint, model=args.model, teacher=args.teacher, teacher_weights=args.teacher_weights)
    if distiller.trainable.pca_proj is None:
        raise UserError(f"{args.checkpoint} was trained without the attention projector (use_pca: false): no map to draw")
    crop = pick(checkpoint, "train_crop_size")  # the distiller's grid
    dataset = build_val_dataset(
        pick(checkpoint, "data_path", args.data_path),
        pick(checkpoint, "val_resize_size", args.val_resize_size),
        crop,
        pick(checkpoint, "interpolation"),
    )
    check_class_count(num_classes_of(distiller.student), dataset, args.checkpoint)
    device = torch.device(args.device)
    distiller.to(device)

    count = min(args.num_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    distiller.trainable.train(args.batch_stats)  # running statistics are not saved: no harm done
    teacher_maps, student_maps = (maps.float().cpu() for maps in distiller.attention_maps(images))
    distiller.close()
    tokens = teacher_maps.shape[-1]
    cell = args.cell or tokens * -(-160 // tokens)
    canvas, scales = render(teacher_maps, student_maps, cell, args.pad)
    write_png(canvas, args.output)

    norm = "batch statistics of these images" if args.batch_stats else "running statistics (eval mode)"
    print(f"teacher {teacher}, student of {args.checkpoint} with BatchNorm on {norm}")
    print(f"maps {tokens}x{tokens} (query token down, key token across)")
    for i, (lo, hi, top, mse) in enumerate(scales):
        path = os.path.relpath(dataset.samples[i][0], dataset.root)
        print(f"row {i} {path}: teacher|student scale {lo:.3g}..{hi:.3g}, |difference| scale 0..{top:.3g}, MSE {mse:.4g}")
    print(f"wrote {args.output} ({canvas.shape[1]}x{canvas.shape[2]} px, {count} rows: teacher | student | |difference|)")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
