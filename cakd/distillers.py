"""The three recipes as modules that return a dict of named loss tensors.

A distiller holds
- ``trainable``: the torchvision student and its projectors, the only part the
  student optimizer updates and DDP wraps;
- the teacher, frozen, in eval mode, run under ``torch.no_grad()``, kept out of the
  module tree (so out of ``parameters()``, ``state_dict()`` and DDP) yet moved by
  ``.to()`` / ``.cuda()`` with the rest;
- ``discriminator`` (CAKD only), trained by its own optimizer.
"""
import contextlib
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import load_reference_state_dict
from .discriminator import PatchGAN, TokenMLP, call_with_snapshot, gan_loss
from .losses import kd_loss
from .models import CNN_STUDENTS, head_name, num_classes_of, student_layout
from .multiview import MultiViewGenerator
from .projectors import AttentionProjector, GroupwiseLinearProjector, PartialCrossAttentionProjector
from .taps import StudentTaps, profiled, teacher_taps


@dataclass
class BaselineConfig:
    label_smoothing: float = 0.0


@dataclass
class LogitsConfig(BaselineConfig):
    """The logits term: the released MSE, or Hinton et al.'s knowledge distillation (``kd``):
    ``(1 - kd_alpha) * CE + kd_alpha * kd_loss(z_S, z_T, kd_temperature)``."""

    logits_form: str = "mse"  # "mse": logits_weight * MSE(z_S, z_T) (released); "kd": Hinton KD (the paper's "Logits")
    logits_weight: float = 1.0  # weight of MSE(z_S, z_T) (logits_form mse)
    kd_temperature: float = 1.0  # T of the kd form (paper silent; torchdistill's and mdistiller's ImageNet KD: 1)
    kd_alpha: float = 0.5  # kd form: weight of the soft-target term, the label term gets 1 - kd_alpha

    def __post_init__(self):
        if self.logits_form not in CHOICES["logits_form"]:
            raise ValueError(f"logits_form={self.logits_form!r} is not one of {', '.join(CHOICES['logits_form'])}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha={self.kd_alpha!r} must be in [0, 1] (the soft-target term's share)")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature={self.kd_temperature!r} must be above 0")

    def logits_term(self, student_logits, teacher_logits):
        """The weighted logits term: ``logits_weight * MSE`` or ``kd_alpha * kd_loss``."""
        if self.logits_form == "kd":
            return self.kd_alpha * kd_loss(student_logits, teacher_logits, self.kd_temperature)
        return self.logits_weight * mse(student_logits, teacher_logits)

    def label_weight(self, with_logits_term: bool = True) -> float:
        """The cross-entropy's weight: ``1 - kd_alpha`` beside a kd term, else 1."""
        return 1.0 - self.kd_alpha if with_logits_term and self.logits_form == "kd" else 1.0


@dataclass
class KDConfig(LogitsConfig):
    """Hinton et al.'s knowledge distillation (the paper's "Logits" column)."""

    logits_form: str = "kd"


# the string options of CAKDConfig and their values; the first is the released form
CHOICES = {
    "logits_form": ("mse", "kd"),
    "pca_form": ("released", "paper"),
    "disc_form": ("patchgan", "mlp"),
    "adv_form": ("released", "saturating", "non_saturating"),
    "lambda_form": ("ramp", "constant"),
    "lambda_scope": ("all", "adversarial"),
    "map_fold": ("auto", "always", "never"),
    "pca_loss_norm": ("mean", "relative"),
}


@dataclass
class CAKDConfig(LogitsConfig):
    """Every number and switch of CAKD, with its released value (``reference.md``).

    The paper's forms (``paper.md``, ``configs/cakd_paper.yaml``, ``docs/FIDELITY.md``)
    are other values of the same fields; each can be switched on its own.
    """

    pca_qk_weight: float = 0.2  # first term of L_proj1: MSE(A_S_qk, A_T_qk); paper form: MSE of attention outputs
    pca_vv_weight: float = 0.05  # second term: MSE(A_S_vv, A_T_vv); paper form: MSE of per-head V V^T / sqrt(d)
    token_weight: float = 1.0  # MSE(t_S, t_T), class token
    feature_weight: float = 0.05  # MSE(f_S, f_T), patch tokens
    adv_real_weight: float = 0.05  # weight of the (constant) real term inside the released L_adv
    lambda_start: float = 25.0  # ramp: lambda(e) = min(max(e - start, 0) / span, max)
    lambda_span: float = 50.0
    lambda_max: float = 0.2
    disc_lr_factor: float = 0.01  # discriminator lr = factor * student lr
    disc_real_grad: bool = False  # released quirk 1: L_D's real term is detached
    adv_to_student: bool = False  # released quirk 2: the released L_adv sends no gradient to the student
    pca_heads: int = 16  # released projector's heads and head width (the paper form uses the teacher's)
    pca_head_dim: int = 64
    gl_window: int = 4
    gl_batched: bool = True
    # speed paths, each exact to rounding (tests/test_speed_paths.py)
    map_fold: str = "auto"  # head-mean q k^T maps as x (W_q^T W_k) x^T: the teacher's always, the student's where it saves FLOPs
    zero_lambda_no_grad: bool = True  # lambda = 0: projectors run without autograd, their gradients set to zero
    # paper forms, each off (released) by default
    pca_form: str = "released"  # "paper": 3x3 convs, partial cross, softmax attention outputs (Eq. 1-4)
    pca_loss_norm: str = "mean"  # paper form: "mean" squared error, or "relative": divided by the teacher target's mean square
    pca_lr_factor: float = 1.0  # the attention projector's lr = factor x the student's
    pca_swap_prob: float = 0.5  # paper form: probability that an element of Q, K, V takes the teacher's value
    gl_dropout: float = 0.0  # dropout before the group-wise FCs (paper: yes, rate ours 0.1)
    multiview_prob: float = 0.0  # probability that the student sees a transformed view (paper Eq. 7: 0.5)
    disc_form: str = "patchgan"  # "mlp": per-token MLP on h_T (real) vs h'_S (fake), Eq. 8
    disc_every: int = 1  # the discriminator steps at global iterations divisible by this (Algorithm 1: 5)
    disc_loss_weight: float = 0.5  # L_D = weight * (real term + fake term); Eq. 8 sums them: 1
    adv_form: str = "released"  # "saturating": mean(log(1 - D(h'_S))) (Eq. 9), "non_saturating": -mean(log D(h'_S))
    lambda_form: str = "ramp"  # "constant": lambda = lambda_constant
    lambda_constant: float = 0.1
    lambda_scope: str = "all"  # what lambda scales: "all" distillation terms, or the "adversarial" one (Eq. 10)
    use_pca: bool = True  # the attention projector's term L_proj1 (and the projector)
    use_logits: bool = True  # MSE(z_S, z_T) inside L_proj2
    use_token: bool = True  # MSE(t_S, t_T) inside L_proj2 (and the token projector)
    use_cls: bool = True  # cross-entropy with the labels
    use_adv: bool = True  # the adversarial term (and the discriminator)

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("pca_swap_prob", "multiview_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a probability in [0, 1]")
        if not 0.0 <= self.gl_dropout < 1.0:
            raise ValueError(f"gl_dropout={self.gl_dropout!r} must be in [0, 1)")
        if not self.pca_lr_factor > 0:
            raise ValueError(f"pca_lr_factor={self.pca_lr_factor!r} must be above 0 (use_pca: false leaves the projector out)")
        if self.disc_every < 1:
            raise ValueError(f"disc_every={self.disc_every!r} must be 1 or more")
        if self.use_adv and self.disc_form == "patchgan" and not self.use_pca:
            raise ValueError("disc_form=patchgan reads the attention projector's maps: turn use_pca on or use disc_form=mlp")


def mse(a, b):
    """Mean squared error in float32 (targets may come from bf16/fp16 autocast)."""
    return F.mse_loss(a.float(), b.float())


def relative_mse(a, target):
    """``mse(a, target) / mean(target^2)``: the squared error relative to the target's energy."""
    target = target.float()
    return mse(a, target) / target.pow(2).mean().clamp_min(1e-12)


class StudentWithProjectors(nn.Module):
    """The trained part: student plus projectors, keyed as in the released checkpoint.

    ``forward(images, teacher=None, projector_grad=True)`` returns the student logits and, when
    a tap stage is given, the projectors' outputs (run without autograd if not ``projector_grad``):
    ``attn_qk``/``attn_vv`` (released attention projector) or ``attn_out``/``value_maps``
    (paper's, which also reads the teacher's q, k, v from ``teacher``), ``student_tokens`` (the
    tapped stage's own tokens h_S), ``patch_tokens`` (h'_S) and ``cls_token``. Projectors that
    are None are skipped.
    """

    def __init__(self, student, stage=None, pca_proj=None, gl_proj=None, cls_proj=None):
        super().__init__()
        self.student = student
        self.pca_proj = pca_proj
        self.gl_proj = gl_proj
        self.cls_proj = cls_proj
        self.taps = StudentTaps(student, stage, head_name(student)) if stage else None

    def projector_state_dict(self):
        """The projectors' entries of :meth:`state_dict`, keyed as there (the student's left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    @staticmethod
    def joined(student_state, projector_state):
        """A whole :meth:`state_dict` from the student's own state and :meth:`projector_state_dict`."""
        return {**{"student." + k: v for k, v in student_state.items()}, **projector_state}

    def forward(self, images, teacher=None, projector_grad=True):
        out = {"logits": self.student(images)}
        if self.taps is not None:
            feature, pooled = self.taps.pop_map()
            if projector_grad:
                out.update(self.project(feature, pooled, teacher))
            else:
                with torch.no_grad():
                    out.update(self.project(feature.detach(), pooled.detach(), teacher))
        return out

    def project(self, feature, pooled, teacher=None):
        """The projectors' outputs from the tapped feature map and pooled feature."""
        out = {}
        tokens = feature.flatten(2).transpose(1, 2)
        with profiled("cakd.attention_projector"):
            if isinstance(self.pca_proj, PartialCrossAttentionProjector):
                out.update(self.pca_proj(feature, teacher))
            elif self.pca_proj is not None:
                out["attn_qk"], out["attn_vv"] = self.pca_proj(tokens)
        out["student_tokens"] = tokens  # h_S, before the group-wise projector
        with profiled("cakd.groupwise_projector"):
            out["patch_tokens"] = self.gl_proj(tokens)
        if self.cls_proj is not None:
            with profiled("cakd.token_projector"):
                out["cls_token"] = self.cls_proj(pooled)
        return out

    def projector_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("student.")]


class ZeroGradients(torch.autograd.Function):
    """A zero whose backward gives each input a zero gradient (not None, so SGD still applies
    weight decay and momentum to it, as after a backward multiplied by lambda = 0)."""

    @staticmethod
    def forward(ctx, *params):
        ctx.save_for_backward(*params)
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros_like(p) for p in ctx.saved_tensors)


class Distiller(nn.Module):
    """Base class. Subclasses implement ``forward(images, targets, epoch) -> dict``."""

    config_class = BaselineConfig
    logs_distill_weight = False  # TEMPORARY (params branch): the lead re-does it in cakd/distillers/

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

    def compile(self, **kwargs):
        """``torch.compile`` the trainable part (through its DDP wrapper when there is one) and
        the teacher; the taps' hooks are traced with them."""
        self.set_student_runner(torch.compile(self.student_runner, **kwargs))
        if self._teacher_taps is not None:
            self._teacher_taps.runner = torch.compile(self._teacher, **kwargs)
        return self

    @property
    def student_runner(self):
        """What runs the trainable part: its DDP or compiled wrapper, or itself."""
        return self._student_runner if self._student_runner is not None else self.trainable

    def run_student(self, images, teacher=None, projector_grad=True):
        """The single call path of the trainable part (through DDP when wrapped); ``teacher``
        (the teacher's outputs) goes to projectors that read them."""
        kwargs = {} if teacher is None else {"teacher": teacher}
        if not projector_grad:
            kwargs["projector_grad"] = False
        out = self.student_runner(images, **kwargs)
        self.last_logits = out["logits"].detach()  # for training accuracy, no extra forward
        return out

    def run_teacher(self, images):
        size = self._teacher_taps.image_size
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

    def disc_due(self, step: int) -> bool:
        """Whether the discriminator steps at global iteration ``step``."""
        return self.discriminator is not None

    def lr_factors(self) -> dict:
        """``{parameter: factor}``: trainable parameters whose lr is ``factor`` x the student's."""
        return {}

    def close(self):
        """Remove every hook this distiller put on the student and teacher now (its taps also
        remove them when they are garbage-collected with the distiller)."""
        for taps in (self.trainable.taps if hasattr(self.trainable, "taps") else None, self._teacher_taps):
            if taps is not None:
                taps.remove()

    def load_reference_state_dict(self, state_dict, discriminator_state_dict=None):
        """Load a student checkpoint of the released code (``checkpoint["model"]``)."""
        load_reference_state_dict(self, state_dict, discriminator_state_dict)


class BaselineDistiller(Distiller):
    """The plain student: cross-entropy only."""

    def forward(self, images, targets, epoch=0):
        cls = self.cross_entropy(self.run_student(images)["logits"], targets)
        return {"cls": cls, "total": cls}


class LogitsDistiller(Distiller):
    """Logit matching: ``L_cls + w * MSE(z_S, z_T)`` (released), or Hinton KD
    ``(1 - alpha) * L_cls + alpha * kd_loss(z_S, z_T, T)`` (``logits_form="kd"``)."""

    config_class = LogitsConfig

    def forward(self, images, targets, epoch=0):
        teacher = self.run_teacher(images)
        logits = self.run_student(images)["logits"]
        cls = self.cross_entropy(logits, targets)
        match = self.config.logits_term(logits, teacher["logits"])
        name = "kd" if self.config.logits_form == "kd" else "logits"
        return {"cls": cls, name: match, "total": self.config.label_weight() * cls + match}


class KDDistiller(LogitsDistiller):
    """Hinton et al.'s knowledge distillation, the paper's "Logits" column: the logits recipe
    with ``logits_form="kd"`` (``T = 1``, ``alpha = 0.5`` unless set)."""

    config_class = KDConfig


class CAKDDistiller(Distiller):
    """CAKD: the released step (``reference.md``) by default, the paper's forms by config.

    ``L = L_cls + lambda * (L_pca + L_gl + L_adv)`` (released; ``lambda_scope="all"``) or
    ``L = L_cls + L_pca + L_gl + lambda * L_adv`` (Eq. 10; ``lambda_scope="adversarial"``),
    each term present when switched on. The discriminator's own loss ``L_D`` is returned as
    ``disc``; the trainer steps D with it when :meth:`disc_due`.
    """

    config_class = CAKDConfig
    logs_distill_weight = True  # TEMPORARY (params branch): the lead re-does it in cakd/distillers/

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prob = self.config.multiview_prob
        self.multiview = MultiViewGenerator(prob) if prob > 0 else None

    def distill_weight(self, epoch: int) -> float:
        c = self.config
        if c.lambda_form == "constant":
            return c.lambda_constant
        return min(max(epoch - c.lambda_start, 0) / c.lambda_span, c.lambda_max)

    def disc_due(self, step: int) -> bool:
        return self.discriminator is not None and step % self.config.disc_every == 0

    def lr_factors(self) -> dict:
        proj, factor = self.trainable.pca_proj, self.config.pca_lr_factor
        return {} if proj is None or factor == 1.0 else {p: factor for p in proj.parameters()}

    @torch.no_grad()
    def attention_maps(self, images):
        """``(teacher, student)``: the head-mean pre-softmax ``q k^T / sqrt(d)`` maps (B, N, N) of
        the teacher's last block and of the student's attention projector (either form; the
        paper's unswapped), with the modules in their current modes: for pictures and logs."""
        proj = self.trainable.pca_proj
        if proj is None:
            raise ValueError("this run has no attention projector (use_pca is off): it has no attention map")
        taps = self._teacher_taps
        flags = taps.attention, getattr(proj, "score_map", None)
        taps.attention = True
        if isinstance(proj, PartialCrossAttentionProjector):
            proj.score_map = True
        try:
            t = self.run_teacher(images)
            s = self.trainable(images, teacher=t)
        finally:
            taps.attention = flags[0]
            if isinstance(proj, PartialCrossAttentionProjector):
                proj.score_map = flags[1]
        return t["attn_qk"], s["attn_qk"]

    def forward(self, images, targets, epoch=0):
        c = self.config
        t = self.run_teacher(images)  # the teacher always sees the clean batch
        student_images = self.multiview(images) if self.multiview is not None else images
        lam = self.distill_weight(epoch)
        # lambda = 0 scales every distillation term (and its gradient) by 0: the projectors run
        # without autograd and get zero gradients, the same update for less work
        skip = c.zero_lambda_no_grad and lam == 0 and c.lambda_scope == "all" and c.use_cls and torch.is_grad_enabled()
        paper_teacher = t if c.use_pca and c.pca_form == "paper" else None
        s = self.run_student(student_images, teacher=paper_teacher, projector_grad=not skip)
        losses = {"cls": self.cross_entropy(s["logits"], targets)}
        kd = c.use_logits and c.logits_form == "kd"
        with profiled("cakd.loss_terms"):
            if kd:  # the paper's "Logits": its own term, beside L_proj1 and L_proj2
                losses["kd"] = c.logits_term(s["logits"], t["logits"])
            if c.use_pca:
                losses["pca"] = self.attention_loss(s, t)
            losses["gl"] = self.groupwise_loss(s, t)
        if self.discriminator is not None:
            losses["adv"], losses["disc"] = self.adversarial_losses(s, t)
        with profiled("cakd.loss_terms"):
            distill_terms = [losses[name] for name in ("kd", "pca", "gl") if name in losses]
            adv_terms = [losses["adv"]] if "adv" in losses else []
            if c.lambda_scope == "all":
                distill = lam * sum(distill_terms + adv_terms)
            else:
                distill = sum(distill_terms + [lam * adv for adv in adv_terms])
            losses["total"] = c.label_weight(kd) * losses["cls"] + distill if c.use_cls else distill
            if skip:
                losses["total"] = losses["total"] + ZeroGradients.apply(*self.trainable.projector_parameters())
        return losses

    def attention_loss(self, s, t):
        """L_proj1. Released: weighted MSE of the head-mean score maps. Paper (Eq. 4): MSE of
        the (partially crossed) softmax attention outputs plus MSE of per-head V V^T / sqrt(d)."""
        c = self.config
        if c.pca_form == "paper":
            err = relative_mse if c.pca_loss_norm == "relative" else mse
            return c.pca_qk_weight * err(s["attn_out"], t["attn_out"]) + c.pca_vv_weight * err(s["value_maps"], t["value_maps"])
        return c.pca_qk_weight * mse(s["attn_qk"], t["attn_qk"]) + c.pca_vv_weight * mse(s["attn_vv"], t["attn_vv"])

    def groupwise_loss(self, s, t):
        """L_proj2: logits and class-token MSE (released; each switchable), patch-token MSE.
        A kd-form logits term is not part of it (:meth:`forward` adds it as ``kd``)."""
        c = self.config
        terms = []
        if c.use_logits and c.logits_form == "mse":
            terms.append(c.logits_term(s["logits"], t["logits"]))
        if c.use_token:
            terms.append(c.token_weight * mse(s["cls_token"], t["cls_token"]))
        terms.append(c.feature_weight * mse(s["patch_tokens"], t["patch_tokens"]))
        return sum(terms)

    def adversarial_losses(self, s, t):
        """``(L_adv, L_D)``; ``D = sigmoid(discriminator logit)``, real = teacher, fake = student.

        PatchGAN (released) reads the head-mean q k^T maps, the MLP (paper) the patch tokens
        h_T and h'_S. ``L_D = w * (-mean(log D(real)) - mean(log(1 - D(fake))))`` on the
        detached fake (Eq. 8 with w = 1; released w = 0.5 and the real term detached).
        ``L_adv``: released ``0.05 * -mean(log D(real)) - mean(log D(fake))`` with the fake
        detached (no gradient) unless ``adv_to_student``; saturating (Eq. 9)
        ``mean(log(1 - D(fake)))``; non-saturating ``-mean(log D(fake))``. Whenever the
        student gets a gradient, D is the snapshot taken at this forward
        (:func:`call_with_snapshot`), so D may step in place before the student's backward.
        """
        c = self.config
        disc_net = self.discriminator
        if c.disc_form == "patchgan":
            real, fake = t["attn_qk"].unsqueeze(1), s["attn_qk"].unsqueeze(1)
        else:
            real, fake = t["patch_tokens"], s["patch_tokens"]
        with profiled("cakd.discriminator"):
            with contextlib.nullcontext() if c.disc_real_grad else torch.no_grad():
                p_real = disc_net(real)  # no graph when only its value is read
            p_fake = disc_net(fake.detach())
            # released: the adversarial term reads the detached fake logit, a value with no
            # gradient; otherwise the discriminator as it was at this forward, with the gradient
            # reaching the student
            if c.adv_form == "released" and not c.adv_to_student:
                p_fake_adv = p_fake.detach()
            else:
                p_fake_adv = call_with_snapshot(disc_net, fake)
        with profiled("cakd.loss_terms"):
            disc = c.disc_loss_weight * (gan_loss(p_real if c.disc_real_grad else p_real.detach(), True) + gan_loss(p_fake, False))
            if c.adv_form == "released":
                adv = c.adv_real_weight * gan_loss(p_real.detach(), True) + gan_loss(p_fake_adv, True)
            elif c.adv_form == "saturating":
                adv = -gan_loss(p_fake_adv, False)  # mean(log(1 - D(fake)))
            else:
                adv = gan_loss(p_fake_adv, True)  # -mean(log D(fake))
        return adv, disc


DISTILLERS = {"baseline": BaselineDistiller, "logits": LogitsDistiller, "kd": KDDistiller, "cakd": CAKDDistiller}


def make_config(recipe: str, **overrides):
    if recipe not in DISTILLERS:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(DISTILLERS)}")
    config_class = DISTILLERS[recipe].config_class
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the {recipe} recipe; known: {', '.join(sorted(known))}")
    return replace(config_class(), **overrides)


def build_distiller(recipe: str, student, teacher=None, image_size=None, **overrides) -> Distiller:
    """Wrap ``student`` (and ``teacher``) into the named recipe; ``overrides`` set config values.

    ``image_size``: the training crop, which fixes the teacher's token grid and so the student
    stage that is distilled (default: a ViT teacher's own ``image_size``, else 224).
    """
    config = make_config(recipe, **overrides)
    cls = DISTILLERS[recipe]
    if recipe == "baseline":
        return cls(StudentWithProjectors(student), config=config)
    if teacher is None:
        raise ValueError(f"the {recipe} recipe needs a teacher")
    image_size = image_size or getattr(teacher, "image_size", 224)
    if issubclass(cls, LogitsDistiller):
        taps = teacher_taps(teacher, image_size, attention=False, tokens=False)
        check_classes(recipe, student, teacher)
        return cls(StudentWithProjectors(student), teacher, teacher_taps=taps, config=config)
    patchgan = config.use_adv and config.disc_form == "patchgan"
    paper_pca = config.use_pca and config.pca_form == "paper"
    released_maps = (config.use_pca and config.pca_form == "released") or patchgan
    taps = teacher_taps(teacher, image_size, attention=released_maps, tokens=True, qkv=paper_pca, fold=config.map_fold)
    if type(student).__name__ in ("VisionTransformer", "SwinTransformer"):
        raise ValueError(f"the {recipe} recipe distils into a CNN's feature map: use a CNN student ({', '.join(CNN_STUDENTS)})")
    layout = student_layout(student, image_size)
    stage, channels = layout.stage_for(taps.grid)
    check_classes(recipe, student, teacher)
    width, heads = taps.width, taps.num_heads
    if not config.use_pca:
        pca_proj = None
    elif paper_pca:  # the teacher's heads and widths, so Q, K, V can be swapped element by element
        pca_proj = PartialCrossAttentionProjector(channels, heads, width // heads, config.pca_swap_prob, score_map=patchgan)
    else:
        pca_proj = AttentionProjector(channels, config.pca_heads, config.pca_head_dim, config.map_fold)
    trainable = StudentWithProjectors(
        student,
        stage,
        pca_proj=pca_proj,
        gl_proj=GroupwiseLinearProjector(taps.grid, channels, width, config.gl_window, config.gl_batched, config.gl_dropout),
        cls_proj=nn.Linear(layout.pooled_dim, width) if config.use_token else None,
    )
    discriminator = None
    if config.use_adv:
        discriminator = PatchGAN() if patchgan else TokenMLP(width)
    return cls(trainable, teacher, discriminator=discriminator, teacher_taps=taps, config=config)


def check_classes(recipe, student, teacher):
    student_classes, teacher_classes = num_classes_of(student), num_classes_of(teacher)
    if student_classes != teacher_classes:
        raise ValueError(
            f"the {recipe} recipe matches logits, but the teacher predicts {teacher_classes} classes and the "
            f"student/dataset {student_classes}: use a teacher trained on the dataset's classes"
        )
