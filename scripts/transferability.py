"""Figure 3(b)'s "knowledge transferability": how close the student's features come to the
teacher's, as the mean cosine similarity of their tokens on validation images.

    python scripts/transferability.py --checkpoint runs/cakd/checkpoint.pth [--num-images 1000] [--json FILE]

For each image and each of the N tokens of the teacher's grid, the cosine similarity between
the teacher's token ``h_T`` (its final norm's output) and
- CAKD's projection of the student's feature, ``h'_S`` (the group-wise projector's output on
  the tapped stage: a cakd-recipe checkpoint only), and
- the paper's "direct mapping": one linear map with bias from the student's own tokens ``h_S``
  (the same stage) to ``h_T``, fitted by least squares on the same tokens.
Both are averaged over every token of every image. Student and teacher are rebuilt as the
trainer built them, in eval mode, at the training crop (DATA/val images, eval resize, center
crop to the training crop). The paper reads, for a ResNet-50 student: direct mapping about
0.56 (ViT-B/16 teacher) and 0.53 (Swin-L), CAKD about 0.78 and 0.73.
"""
import argparse
import json
import os
import sys

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from cakd.train.checkpoints import SourceCheckpoint
from cakd.train.config import HelpFormatter
from cakd.train.report import UserError, run_and_report
from cakd.train.distributed import check_device
from cakd.train.scriptkit import add_shared_flags, pick, rebuild_distiller, training_crop_val_dataset

PAPER = {"vit_b_16": (0.78, 0.56), "swin_l": (0.73, 0.53)}  # Figure 3(b), ResNet-50 student: CAKD, direct mapping


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Mean cosine similarity of student and teacher features (Figure 3(b))",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    add_shared_flags(
        p, "checkpoint", "data_path", "model", "teacher", "teacher_weights", "device", required=("checkpoint",),
        checkpoint="a training checkpoint of any recipe, or a released-code checkpoint (CAKD's projection needs a cakd run)",
    )
    p.add_argument("--num-images", default=None, type=int, help="the first N validation images (default: all)")
    p.add_argument("--batch-size", default=32, type=int, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", default=min(4, os.cpu_count() or 1), type=int, help="data loading workers (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file (default: none)")
    return p


def features(distiller, loader, device):
    """Per batch: the student's own tokens h_S, its projection h'_S (None without projectors) and the teacher's h_T."""
    for images, _ in loader:
        images = images.to(device)
        teacher = distiller.run_teacher(images)["patch_tokens"].float()
        student = distiller.trainable(images)
        yield student["student_tokens"].float(), student["patch_tokens"].float(), teacher


def fit_linear_map(distiller, loader, device):
    """Least squares ``[h_S, 1] W = h_T`` over all tokens, from the normal equations in float64
    (with a ridge of 1e-8 of their mean diagonal, which only steadies a singular system)."""
    gram = cross = None
    for student_tokens, _, teacher_tokens in features(distiller, loader, device):
        x = F.pad(student_tokens.flatten(0, 1), (0, 1), value=1.0).double()
        y = teacher_tokens.flatten(0, 1).double()
        gram = x.T @ x if gram is None else gram + x.T @ x
        cross = x.T @ y if cross is None else cross + x.T @ y
    ridge = 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge, cross).float()


@torch.no_grad()
def run(args):
    device = check_device(args.device)
    checkpoint = SourceCheckpoint(args.checkpoint)
    has_projectors = checkpoint.recipe() == "cakd"
    # a baseline or logits run's student gets the cakd recipe's taps, and no projectors
    distiller, teacher = rebuild_distiller(
        checkpoint, recipe="cakd", model=args.model, teacher=args.teacher, teacher_weights=args.teacher_weights
    )
    dataset = training_crop_val_dataset(checkpoint, distiller.student, args.data_path)
    if args.num_images is not None:
        if args.num_images < 1:
            raise UserError("--num-images must be at least 1")
        dataset = Subset(dataset, range(min(args.num_images, len(dataset))))
    distiller.to(device).eval()
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)

    weight = fit_linear_map(distiller, loader, device)
    projected = direct = tokens = 0.0
    for student_tokens, projected_tokens, teacher_tokens in features(distiller, loader, device):
        mapped = F.pad(student_tokens, (0, 1), value=1.0) @ weight
        direct += F.cosine_similarity(mapped, teacher_tokens, dim=-1).sum().item()
        projected += F.cosine_similarity(projected_tokens, teacher_tokens, dim=-1).sum().item()
        tokens += teacher_tokens.shape[0] * teacher_tokens.shape[1]
    distiller.close()
    results = {"direct_mapping": direct / tokens, "cakd": projected / tokens if has_projectors else None}
    stage = distiller.trainable.taps.stage
    print(f"transferability: student of {args.checkpoint} ({checkpoint.recipe()} recipe, stage {stage}) vs teacher {teacher}, "
          f"{len(dataset)} images x {teacher_tokens.shape[1]} tokens")
    if has_projectors:
        print(f"  CAKD projection h'_S (group-wise projector) vs h_T: mean cosine {results['cakd']:.4f}")
    else:
        print("  CAKD projection: none (the run has no projectors)")
    print(f"  direct mapping (a linear map of h_S fitted on these tokens) vs h_T: mean cosine {results['direct_mapping']:.4f}")
    if tokens < 10 * weight.shape[0]:
        print(f"  note: {int(tokens)} tokens for a map of {weight.shape[0]} inputs (under 10 per input): a map fitted on so few "
              "tokens fits these tokens, not the teacher in general, so the direct mapping's number says little; use more images")
    name = pick(checkpoint, "teacher")
    if name in PAPER and pick(checkpoint, "model", args.model) == "resnet50":
        print(f"  paper Figure 3(b), ResNet-50 <- {name}: CAKD about {PAPER[name][0]}, direct mapping about {PAPER[name][1]}")
    if args.json:
        record = {"checkpoint": args.checkpoint, "images": len(dataset), "tokens": int(tokens), **results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return results


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
