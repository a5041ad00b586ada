"""The steps being measured: the ideal (one plain student step plus one teacher forward) and
each recipe's training step, built by name."""
import copy

import torch
import torch.nn.functional as F

import cakd
from cakd.distillers import CAKDDistiller, make_config
from cakd.train.engine import autocast, training_step

MODES = ("ideal", "baseline", "logits", "cakd", "released_style")
PLAIN = {"map_fold": "never", "zero_lambda_no_grad": False}  # cakd_plain: the switchable speed paths off
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ReleasedStyleCAKD(CAKDDistiller):
    """The released step's cost: the teacher runs with autograd on and its targets stay attached
    (the numbers are the same, the backward pass also goes through the ViT)."""

    def run_teacher(self, images):
        self._teacher.requires_grad_(True)
        return self._teacher_taps(images)


class StudentAndProjectorSGD:
    """One SGD for the student's parameters, one for the projectors': per parameter the same
    update as a single SGD over both, so that the profile can time the projectors' share."""

    def __init__(self, trainable, **kwargs):
        self.optimizers = [torch.optim.SGD(trainable.student.parameters(), **kwargs),
                           torch.optim.SGD(trainable.projector_parameters(), **kwargs)]
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def projectors(self):
        """The projectors' SGD."""
        return self.optimizers[1]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()


def ideal_step(student, teacher, optimizer, images, targets, amp_dtype):
    """One plain student step (CE, backward, SGD) and one teacher forward in inference mode."""
    with autocast(amp_dtype, images.device.type):
        with torch.inference_mode():
            teacher(images)
        loss = F.cross_entropy(student(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def build_distiller(mode, student, teacher, image_size):
    """The distiller of ``mode``: ``released_style`` is the cakd recipe built as
    :class:`ReleasedStyleCAKD` (same modules and numbers, the released cost); ``cakd_plain`` the
    cakd recipe with :data:`PLAIN`; any other mode the recipe of that name."""
    if mode == "released_style":
        return ReleasedStyleCAKD.build(student, teacher, image_size, make_config("cakd"))
    if mode == "cakd_plain":
        return cakd.build_distiller("cakd", student, teacher, image_size, **PLAIN)
    return cakd.build_distiller(mode, student, teacher, image_size)


def build_mode(mode, student, teacher, args, device, memory_format, split_optimizer=False, name_optimizers=None):
    """Returns a step function for ``mode`` and a cleanup function; ``split_optimizer``: the
    projectors get their own SGD (for the profile); ``name_optimizers(projectors, discriminator)``,
    when given, is called with those SGDs (either may be None) before the first step."""
    student = copy.deepcopy(student)
    if mode == "ideal":
        student.to(device, memory_format=memory_format)
        teacher_run = torch.compile(teacher) if args.compile else teacher
        student_run = torch.compile(student) if args.compile else student
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
        return (lambda images, targets, amp_dtype: ideal_step(student_run, teacher_run, optimizer, images, targets, amp_dtype)), (
            lambda: None
        )
    distiller = build_distiller(mode, student, teacher, args.image_size)
    distiller.to(device, memory_format=memory_format)
    distiller.train()
    if args.compile:
        distiller.compile()
    if split_optimizer:
        optimizer = StudentAndProjectorSGD(distiller.trainable, lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=1e-3, momentum=0.9)
    disc_optimizer = None
    if distiller.discriminator is not None:
        disc_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=1e-5, momentum=0.9)
    if name_optimizers is not None:
        name_optimizers(optimizer.projectors if split_optimizer else None, disc_optimizer)
    scaler = torch.amp.GradScaler(device.type) if args.dtype == "fp16" else None

    def step(images, targets, amp_dtype):
        return training_step(distiller, images, targets, args.epoch, optimizer, disc_optimizer, scaler, amp_dtype=amp_dtype)["total"]

    def cleanup():
        distiller.close()
        teacher.requires_grad_(False)

    return step, cleanup
