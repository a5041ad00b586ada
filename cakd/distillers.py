"""The three recipes as modules that return a dict of named loss tensors.

A distiller holds
- ``trainable``: the torchvision student and its projectors, the only part the
  student optimizer updates and DDP wraps;
- the teacher, frozen, in eval mode, run under ``torch.no_grad()``, kept out of the
  module tree (so out of ``parameters()``, ``state_dict()`` and DDP) yet moved by
  ``.to()`` / ``.cuda()`` with the rest;
- ``discriminator`` (CAKD only), trained by its own optimizer.
"""
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from .discriminator import PatchGAN, call_with_snapshot, gan_loss
from .models import match_stage, stage_channels, teacher_grid
from .projectors import AttentionProjector, GroupwiseLinearProjector
from .taps import ResNetTaps, ViTTaps


@dataclass
class BaselineConfig:
    label_smoothing: float = 0.0


@dataclass
class LogitsConfig(BaselineConfig):
    logits_weight: float = 1.0  # MSE(z_S, z_T)


@dataclass
class CAKDConfig(LogitsConfig):
    """Every number of the released recipe, with its released value."""

    pca_qk_weight: float = 0.2  # MSE(A_S_qk, A_T_qk)
    pca_vv_weight: float = 0.05  # MSE(A_S_vv, A_T_vv)
    token_weight: float = 1.0  # MSE(t_S, t_T), class token
    feature_weight: float = 0.05  # MSE(f_S, f_T), patch tokens
    adv_real_weight: float = 0.05  # weight of the (constant) real term inside L_adv
    lambda_start: float = 25.0  # lambda(e) = min(max(e - start, 0) / span, max)
    lambda_span: float = 50.0
    lambda_max: float = 0.2
    disc_lr_factor: float = 0.01  # discriminator lr = factor * student lr
    disc_real_grad: bool = False  # released quirk 1: L_D's real term is detached
    adv_to_student: bool = False  # released quirk 2: L_adv sends no gradient to the student
    pca_heads: int = 16
    pca_head_dim: int = 64
    gl_window: int = 4
    gl_batched: bool = True


def mse(a, b):
    """Mean squared error in float32 (targets may come from bf16/fp16 autocast)."""
    return F.mse_loss(a.float(), b.float())


class StudentWithProjectors(nn.Module):
    """The trained part: student plus projectors, keyed as in the released checkpoint.

    ``forward(images)`` returns the student logits and, when a tap stage is given, the
    projected attention maps, patch tokens and class token.
    """

    def __init__(self, student, stage=None, pca_proj=None, gl_proj=None, cls_proj=None):
        super().__init__()
        self.student = student
        self.pca_proj = pca_proj
        self.gl_proj = gl_proj
        self.cls_proj = cls_proj
        self.taps = ResNetTaps(student, stage) if stage else None

    def forward(self, images):
        out = {"logits": self.student(images)}
        if self.taps is not None:
            tokens, pooled = self.taps.pop()
            out["attn_qk"], out["attn_vv"] = self.pca_proj(tokens)
            out["patch_tokens"] = self.gl_proj(tokens)
            out["cls_token"] = self.cls_proj(pooled)
        return out


class Distiller(nn.Module):
    """Base class. Subclasses implement ``forward(images, targets, epoch) -> dict``."""

    config_class = BaselineConfig

    def __init__(self, trainable, teacher=None, discriminator=None, teacher_taps=None, config=None):
        super().__init__()
        self.trainable = trainable
        self.discriminator = discriminator
        self.config = config or self.config_class()
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: see module docstring
        object.__setattr__(self, "_teacher_taps", teacher_taps)
        object.__setattr__(self, "_student_runner", None)
        if teacher is not None:
            teacher.eval()

    @property
    def student(self):
        return self.trainable.student

    @property
    def teacher(self):
        return self._teacher

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def set_student_runner(self, runner):
        """Run the trainable part through ``runner`` (its DDP or compiled wrapper) from now on."""
        object.__setattr__(self, "_student_runner", runner)

    def run_student(self, images):
        out = (self._student_runner or self.trainable)(images)
        self.last_logits = out["logits"].detach()  # for training accuracy, no extra forward
        return out

    def run_teacher(self, images):
        teacher = self._teacher
        size = teacher.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the teacher was built for {size}x{size}: "
                f"build it with image_size={images.shape[-1]} or crop the images to {size}"
            )
        with torch.no_grad():
            return self._teacher_taps(images)

    def cross_entropy(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)

    def distill_weight(self, epoch: int) -> float:
        return 1.0

    def close(self):
        """Remove every hook this distiller put on the student and teacher."""
        for taps in (self.trainable.taps if hasattr(self.trainable, "taps") else None, self._teacher_taps):
            if taps is not None:
                taps.remove()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def load_reference_state_dict(self, state_dict, discriminator_state_dict=None):
        """Load a student checkpoint of the released code (``checkpoint["model"]``)."""
        from .checkpoint import load_reference_state_dict

        load_reference_state_dict(self, state_dict, discriminator_state_dict)


class BaselineDistiller(Distiller):
    """The plain student: cross-entropy only."""

    def forward(self, images, targets, epoch=0):
        cls = self.cross_entropy(self.run_student(images)["logits"], targets)
        return {"cls": cls, "total": cls}


class LogitsDistiller(Distiller):
    """Logit matching: ``L_cls + w * MSE(z_S, z_T)``."""

    config_class = LogitsConfig

    def forward(self, images, targets, epoch=0):
        teacher = self.run_teacher(images)
        logits = self.run_student(images)["logits"]
        cls = self.cross_entropy(logits, targets)
        match = self.config.logits_weight * mse(logits, teacher["logits"])
        return {"cls": cls, "logits": match, "total": cls + match}


class CAKDDistiller(Distiller):
    """The released CAKD step (``reference.md``): projector losses, PatchGAN, lambda ramp."""

    config_class = CAKDConfig

    def distill_weight(self, epoch: int) -> float:
        c = self.config
        return min(max(epoch - c.lambda_start, 0) / c.lambda_span, c.lambda_max)

    def forward(self, images, targets, epoch=0):
        c = self.config
        t = self.run_teacher(images)
        s = self.run_student(images)
        cls = self.cross_entropy(s["logits"], targets)
        pca = c.pca_qk_weight * mse(s["attn_qk"], t["attn_qk"]) + c.pca_vv_weight * mse(s["attn_vv"], t["attn_vv"])
        gl = (
            c.logits_weight * mse(s["logits"], t["logits"])
            + c.token_weight * mse(s["cls_token"], t["cls_token"])
            + c.feature_weight * mse(s["patch_tokens"], t["patch_tokens"])
        )
        disc_net = self.discriminator
        real_map, fake_map = t["attn_qk"].unsqueeze(1), s["attn_qk"].unsqueeze(1)
        p_real = disc_net(real_map)
        p_fake = disc_net(fake_map.detach())
        disc = 0.5 * (gan_loss(p_real if c.disc_real_grad else p_real.detach(), True) + gan_loss(p_fake, False))
        # released: BCE of the detached fake map, a value with no gradient; flipped: the
        # discriminator as it was at this forward, with the gradient reaching the student
        p_fake_adv = call_with_snapshot(disc_net, fake_map) if c.adv_to_student else p_fake.detach()
        adv = c.adv_real_weight * gan_loss(p_real.detach(), True) + gan_loss(p_fake_adv, True)
        lam = self.distill_weight(epoch)
        total = cls + lam * (pca + gl + adv)
        return {"cls": cls, "pca": pca, "gl": gl, "adv": adv, "disc": disc, "total": total}


DISTILLERS = {"baseline": BaselineDistiller, "logits": LogitsDistiller, "cakd": CAKDDistiller}


def make_config(recipe: str, **overrides):
    if recipe not in DISTILLERS:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(DISTILLERS)}")
    config_class = DISTILLERS[recipe].config_class
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the {recipe} recipe; known: {', '.join(sorted(known))}")
    return replace(config_class(), **overrides)


def build_distiller(recipe: str, student, teacher=None, **overrides) -> Distiller:
    """Wrap ``student`` (and ``teacher``) into the named recipe; ``overrides`` set config values."""
    config = make_config(recipe, **overrides)
    cls = DISTILLERS[recipe]
    if recipe == "baseline":
        return cls(StudentWithProjectors(student), config=config)
    if teacher is None:
        raise ValueError(f"the {recipe} recipe needs a teacher")
    stage = match_stage(student, teacher)  # also checks both model types
    student_classes, teacher_classes = student.fc.out_features, teacher.num_classes
    if student_classes != teacher_classes:
        raise ValueError(
            f"the {recipe} recipe matches logits, but the teacher predicts {teacher_classes} classes and the "
            f"student/dataset {student_classes}: use a teacher trained on the dataset's classes"
        )
    if recipe == "logits":
        taps = ViTTaps(teacher, attention=False, tokens=False)
        return cls(StudentWithProjectors(student), teacher, teacher_taps=taps, config=config)
    channels, width, grid = stage_channels(student, stage), teacher.hidden_dim, teacher_grid(teacher)
    trainable = StudentWithProjectors(
        student,
        stage,
        pca_proj=AttentionProjector(channels, config.pca_heads, config.pca_head_dim),
        gl_proj=GroupwiseLinearProjector(grid, channels, width, config.gl_window, config.gl_batched),
        cls_proj=nn.Linear(student.fc.in_features, width),
    )
    taps = ViTTaps(teacher, attention=True, tokens=True)
    return cls(trainable, teacher, discriminator=PatchGAN(), teacher_taps=taps, config=config)
