"""A checkpoint's student (or its EMA) as a plain torchvision state dict.

    python scripts/export.py --checkpoint runs/cakd/checkpoint.pth --which ema --output resnet50_cakd_ema.pth

The file loads with ``torchvision.models.get_model(arch, num_classes=K).load_state_dict(sd)``
(strict; a ViT student trained at another crop than 224 needs its ``image_size`` too). What is
written is ``cakd.export_student`` of the student that ``SourceCheckpoint.student_state`` (the
code the evaluation and the trainer's ``--weights`` use) fills. Before writing, that very load is
done on its serialized bytes, and the logits on a random batch are compared with a yardstick
built another way: the student as the trainer's ``--test-only`` restores it
(``checkpoints.Parts.load``: ``model`` into the distiller's student; for ``--which ema``,
``model_ema`` into the trainer's EMA wrapper around it), or, for a released-code checkpoint, the
package's importer. The file is written only if the logits are equal.
"""
import argparse
import io
import sys

import torch

from cakd import export_student
from cakd.weights import load_strict, save_atomic, split_reference_state_dict
from cakd.distillers import BaselineDistiller, StudentWithProjectors
from cakd.students import num_classes_of
from cakd.zoo import architecture, build_student, own_builders
from cakd.train.checkpoints import Parts, SourceCheckpoint
from cakd.train.config import HelpFormatter
from cakd.train.report import UserError, run_and_report
from cakd.train.optim import ExponentialMovingAverage
from cakd.train.scriptkit import add_shared_flags, check_output, load_student, pick, student_arch


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Export a checkpoint's student (or EMA) as a plain torchvision state dict",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    add_shared_flags(p, "checkpoint", "model", required=("checkpoint",))
    p.add_argument("--which", default="student", choices=["student", "ema"], help="the trained student or its EMA (default: student)")
    p.add_argument("--output", required=True, help="the .pth file to write")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return p


def reference_student(checkpoint, which, arch, loaded):
    """The student as the code that wrote the checkpoint holds it: the yardstick of the check.
    ``loaded``: what :func:`load_student` made of the file. A plain state dict has no distiller:
    it is its own yardstick (the check is then the strict load and the round trip through the file's bytes)."""
    if checkpoint.kind == "student":
        return loaded
    student = build_student(arch, num_classes=num_classes_of(loaded), image_size=pick(checkpoint, "train_crop_size"))
    distiller = BaselineDistiller(StudentWithProjectors(student))  # as the trainer's --test-only builds it
    if checkpoint.kind == "released":  # the package's importer, as for a released run
        source = checkpoint.contents["model"] if which == "student" else checkpoint.contents["model_ema"]
        source = {k: v for k, v in source.items() if k != "n_averaged"}
        student_keys = split_reference_state_dict(source)[0]  # the import is strict: no projectors here
        try:
            distiller.load_reference_state_dict(student_keys)
        except ValueError as error:
            raise UserError(f"{checkpoint.path}: {error}") from None
        return distiller.student.eval()
    ema = ExponentialMovingAverage(distiller.student, decay=0.0) if which == "ema" else None  # the trainer's wrapper
    Parts(distiller, ema=ema).load(checkpoint.contents, checkpoint.path, test_only=True)
    return (distiller.student if ema is None else ema.module).eval()


def home(arch):
    """Where the plain model is built: ``torchvision.models.<arch>``, or the module of its own builder
    (``cakd.students.resnet50x2``, ``cakd.teachers.swin.swin_l`` ...)."""
    builder = own_builders().get(arch)
    return f"{builder.__module__ if builder else 'torchvision.models'}.{arch}"


def exported_state(student, which):
    """What is written for ``which``: ``cakd.export_student`` of ``student``, the module that
    :func:`load_student` filled strictly from ``SourceCheckpoint.student_state``."""
    return export_student(student)


@torch.no_grad()
def check_round_trip(state, reference, arch, crop, image_size):
    """Serialize ``state``, load it strictly into a fresh torchvision model, compare its logits
    with ``reference`` (the yardstick, built from the checkpoint by another path).

    Returns the max abs logit difference (0.0 when they are identical)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=True)
    num_classes = num_classes_of(reference)
    plain = architecture(arch, num_classes, image_size)  # torchvision's get_model (or our own builder: resnet50x2, swin_l, deit_b)
    load_strict(plain, loaded, f"the export does not load into {home(arch)}", "this is a bug, please report it")
    plain.eval()
    images = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    expected, got = reference(images), plain(images)
    return (expected - got).abs().max().item(), tuple(images.shape), num_classes


def run(args):
    check_output(args.output, args.checkpoint, args.force, "the checkpoint")
    checkpoint = SourceCheckpoint(args.checkpoint)
    arch = student_arch(checkpoint, args.model)
    loaded = load_student(checkpoint, args.which, arch)  # one clear line for a wrong --model or file
    reference = reference_student(checkpoint, args.which, arch, loaded)
    state = exported_state(loaded, args.which)
    crop = pick(checkpoint, "val_crop_size")
    diff, shape, num_classes = check_round_trip(state, reference, arch, crop, pick(checkpoint, "train_crop_size"))
    verdict = "identical" if diff == 0 else "DIFFERENT"
    print(
        f"check: loads strictly into {home(arch)}(num_classes={num_classes}); "
        f"logits on a random {'x'.join(map(str, shape))} batch vs the checkpoint's {args.which}: max abs diff {diff:.3g} ({verdict})"
    )
    if diff != 0:
        raise UserError(f"the exported {args.which} gives other logits than the checkpoint's (max abs diff {diff:.3g}): not written")
    save_atomic(state, args.output)
    print(f"wrote {args.output}: {args.which} of {args.checkpoint} ({checkpoint.kind} checkpoint), {len(state)} tensors")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
