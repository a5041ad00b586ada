"""CAKD (Liu et al., ACCV 2022): the released step (``reference.md``) by default, the
paper's forms (Eq. 1-10, ``paper.md``) by config: the attention projector, the group-wise
linear projector, the multi-view generator and the discriminator around the student."""
import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..discriminator import PatchGAN, TokenMLP, call_with_snapshot, gan_loss
from ..students import CNN_STUDENTS, student_layout
from ..multiview import MultiViewGenerator
from ..projectors import AttentionProjector, GroupwiseLinearProjector, PartialCrossAttentionProjector
from ..taps import profiled
from ..teachers.registry import family_of, teacher_taps
from ..zoo import check_pair
from .base import Distiller, StudentWithProjectors, check_classes, mse, register_distiller, relative_mse
from .logits import LogitsConfig


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


@dataclass
class CAKDConfig(LogitsConfig):
    """Every number and switch of CAKD, with its released value (``reference.md``).

    The paper's forms (``paper.md``, ``configs/cakd_paper.yaml``, ``docs/FIDELITY.md``)
    are other values of the same fields; each can be switched on its own.
    """

    # the string options and their values; the first is the released form
    CHOICES: ClassVar[dict] = {
        **LogitsConfig.CHOICES,
        "pca_form": ("released", "paper"),
        "disc_form": ("patchgan", "mlp"),
        "adv_form": ("released", "saturating", "non_saturating"),
        "lambda_form": ("ramp", "constant"),
        "lambda_scope": ("all", "adversarial"),
        "map_fold": ("auto", "always", "never"),
        "pca_loss_norm": ("mean", "relative"),
    }

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
        super().__post_init__()  # the CHOICES
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



@register_distiller("cakd")
class CAKDDistiller(Distiller):
    """CAKD: the released step (``reference.md``) by default, the paper's forms by config.

    ``L = L_cls + lambda * (L_pca + L_gl + L_adv)`` (released; ``lambda_scope="all"``) or
    ``L = L_cls + L_pca + L_gl + lambda * L_adv`` (Eq. 10; ``lambda_scope="adversarial"``),
    each term present when switched on. The discriminator's own loss ``L_D`` is returned as
    ``disc``; the trainer steps D with it when :meth:`disc_due`.
    """

    config_class = CAKDConfig
    logs_distill_weight = True  # lambda, printed beside the terms it weighs

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prob = self.config.multiview_prob
        self.multiview = MultiViewGenerator(prob) if prob > 0 else None

    @classmethod
    def check_pair(cls, student, teacher, image_size):
        """A CNN student must have a stage on the teacher's token grid (a transformer student is
        refused when the distiller is built)."""
        if student in CNN_STUDENTS:
            check_pair(student, teacher, image_size)

    @classmethod
    def build(cls, student, teacher, image_size, config):
        """Teacher taps for the terms switched on; the student's stage on the teacher's token grid,
        and the projectors from it to the teacher's widths; the discriminator."""
        patchgan = config.use_adv and config.disc_form == "patchgan"
        paper_pca = config.use_pca and config.pca_form == "paper"
        released_maps = (config.use_pca and config.pca_form == "released") or patchgan
        taps = teacher_taps(teacher, image_size, attention=released_maps, tokens=True, qkv=paper_pca, fold=config.map_fold)
        if family_of(student) is not None:
            raise ValueError(f"the {cls.name} recipe distils into a CNN's feature map: use a CNN student ({', '.join(CNN_STUDENTS)})")
        layout = student_layout(student, image_size)
        stage, channels = layout.stage_for(taps.grid)
        check_classes(cls.name, student, teacher)
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
            grid=taps.grid,
        )
        discriminator = None
        if config.use_adv:
            discriminator = PatchGAN() if patchgan else TokenMLP(width)
        return cls(trainable, teacher, discriminator=discriminator, teacher_taps=taps, config=config)

    def distill_weight(self, epoch: int) -> float:
        c = self.config
        if c.lambda_form == "constant":
            return c.lambda_constant
        return min(max(epoch - c.lambda_start, 0) / c.lambda_span, c.lambda_max)

    def schedule_line(self, epochs: int):
        """When lambda, the weight of the distillation terms, is non-zero, in words."""
        c = self.config
        if c.lambda_scope == "adversarial" and not c.use_adv:
            return "no adversarial term (use_adv false), so lambda (lambda_scope adversarial) weighs nothing"
        weights = [self.distill_weight(epoch) for epoch in range(epochs)]
        scope = "on every distillation term" if c.lambda_scope == "all" else "on the adversarial term"
        nonzero = [epoch for epoch, weight in enumerate(weights) if weight > 0]
        if not nonzero:
            return f"lambda stays 0 in all {epochs} epoch(s): the distillation terms are logged but do not train"
        first, top = nonzero[0], max(weights)
        reached = weights.index(top)
        if first == reached:
            return f"lambda {top:g} from epoch {first} ({scope})"
        return (f"lambda 0 until epoch {first} (the distillation terms are logged but do not train), "
                f"rising to {top:g} at epoch {reached} ({scope})")

    def disc_due(self, step: int) -> bool:
        return self.discriminator is not None and step % self.config.disc_every == 0

    def disc_lr_factor(self) -> float:
        return self.config.disc_lr_factor

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


