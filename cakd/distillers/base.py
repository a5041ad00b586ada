"""What every method shares: the base :class:`Distiller`, the trained part
(:class:`StudentWithProjectors`) and the registry of methods.

A distiller holds
- ``trainable``: the torchvision student and its projectors, the only part the
  student optimizer updates and DDP wraps;
- the teacher, frozen, in eval mode, run under ``torch.no_grad()``, kept out of the
  module tree (so out of ``parameters()``, ``state_dict()`` and DDP) yet moved by
  ``.to()`` / ``.cuda()`` with the rest;
- ``discriminator`` (or None), trained by its own optimizer.

A method is a subclass registered with :func:`register_distiller`: its config dataclass's
fields become the trainer's flags and YAML keys, and the class says whatever the trainer must
know (its teacher, its pair check, its weight per epoch, its discriminator's lr), so the
trainer never tests a method's name.
"""
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..weights import load_reference_state_dict
from ..students import head_name, num_classes_of
from ..taps import StudentTaps, profiled
from ..teachers.registry import teacher_taps

DISTILLERS = {}  # recipe name -> Distiller subclass, filled by register_distiller


def register_distiller(name: str):
    """Class decorator: make the :class:`Distiller` subclass the recipe ``name`` (``--recipe name``)."""

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}) decorates a Distiller subclass, not {cls!r}")
        if name in DISTILLERS and DISTILLERS[name] is not cls:
            raise ValueError(f"recipe {name!r} is already registered by {DISTILLERS[name].__module__}.{DISTILLERS[name].__name__}")
        cls.name = name
        DISTILLERS[name] = cls
        return cls

    return register


def distiller_class(recipe: str):
    """The registered class of ``recipe``; an unknown name is one error listing the known ones."""
    if recipe not in DISTILLERS:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(sorted(DISTILLERS))} (or load yours with --plugin)")
    return DISTILLERS[recipe]


def config_choices() -> dict:
    """``{field: allowed strings}`` of every registered config (each config's ``CHOICES``)."""
    choices = {}
    for cls in DISTILLERS.values():
        choices.update(getattr(cls.config_class, "CHOICES", {}))
    return choices


def make_config(recipe: str, **overrides):
    """The recipe's config with ``overrides``; an option the recipe does not have is an error."""
    config_class = distiller_class(recipe).config_class
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the {recipe} recipe; known: {', '.join(sorted(known))}")
    return replace(config_class(), **overrides)


def build_distiller(recipe: str, student, teacher=None, image_size=None, **overrides) -> "Distiller":
    """Wrap ``student`` (and ``teacher``) into the named recipe; ``overrides`` set config values.

    ``image_size``: the training crop, which fixes the teacher's token grid and so the student
    stage that is distilled (default: a ViT teacher's own ``image_size``, else 224).
    """
    cls = distiller_class(recipe)
    config = make_config(recipe, **overrides)
    if cls.needs_teacher:
        if teacher is None:
            raise ValueError(f"the {recipe} recipe needs a teacher")
        image_size = image_size or getattr(teacher, "image_size", 224)
    return cls.build(student, teacher, image_size, config)


def check_classes(recipe, student, teacher):
    student_classes, teacher_classes = num_classes_of(student), num_classes_of(teacher)
    if student_classes != teacher_classes:
        raise ValueError(
            f"the {recipe} recipe matches logits, but the teacher predicts {teacher_classes} classes and the "
            f"student/dataset {student_classes}: use a teacher trained on the dataset's classes"
        )


@dataclass
class BaselineConfig:
    label_smoothing: float = 0.0


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
    are None are skipped. ``grid``: the teacher's token grid, to which a tapped map of another
    size (a student of ``students.RESIZED_TO_GRID``) is resized, bilinearly, before the projectors.
    """

    def __init__(self, student, stage=None, pca_proj=None, gl_proj=None, cls_proj=None, grid=None):
        super().__init__()
        self.grid = grid
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
            if self.grid is not None and feature.shape[-2:] != (self.grid, self.grid):
                feature = F.interpolate(feature, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
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
            if self.pca_proj is not None:
                out.update(self.pca_proj.outputs(feature, tokens, teacher))  # each projector says what it reads
        out["student_tokens"] = tokens  # h_S, before the group-wise projector
        with profiled("cakd.groupwise_projector"):
            out["patch_tokens"] = self.gl_proj(tokens)
        if self.cls_proj is not None:
            with profiled("cakd.token_projector"):
                out["cls_token"] = self.cls_proj(pooled)
        return out

    def projector_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("student.")]


class Distiller(nn.Module):
    """Base class of the methods. A subclass implements ``forward(images, targets, epoch) -> dict``
    of named loss tensors: ``total`` (what the student's optimizer minimises), ``cls`` (the label
    term), one entry per distillation term (logged as ``loss_<name>``), and ``disc`` (the
    discriminator's loss) when it has one. The class attributes and methods below are what the
    trainer asks a method; their defaults fit a method with a teacher and no extra module."""

    name = None  # set by register_distiller
    config_class = BaselineConfig
    needs_teacher = True  # the trainer builds and checks a teacher for it
    teacher_tokens = False  # the default build's teacher taps also give cls_token and patch_tokens
    logs_distill_weight = False  # the epoch loop logs distill_weight(epoch) as "lambda"

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

    @classmethod
    def build(cls, student, teacher, image_size, config):
        """The distiller around ``student`` and ``teacher`` at the training crop ``image_size``.
        Default: the student alone, and teacher taps for its logits (and tokens when
        :attr:`teacher_tokens`); a method with projectors or student taps overrides it."""
        if not cls.needs_teacher:
            return cls(StudentWithProjectors(student), config=config)
        taps = teacher_taps(teacher, image_size, attention=False, tokens=cls.teacher_tokens)
        check_classes(cls.name, student, teacher)
        return cls(StudentWithProjectors(student), teacher, teacher_taps=taps, config=config)

    @classmethod
    def check_pair(cls, student: str, teacher: str, image_size: int):
        """Raise ValueError when the named pair cannot be distilled at ``image_size`` (called by
        the trainer before any model is built, so a bad pair costs no time)."""

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
        """The weight of the distillation terms in ``epoch``."""
        return 1.0

    def schedule_line(self, epochs: int):
        """A line for the run's header on how the method weighs its terms over ``epochs``, or None."""
        return None

    def batch_line(self, batch_size: int):
        """A line for the run's header when ``batch_size`` images per process leave a term of the
        method nothing to compare (it logs 0), or None."""
        return None

    def disc_due(self, step: int) -> bool:
        """Whether the discriminator steps at global iteration ``step``."""
        return self.discriminator is not None

    def disc_lr_factor(self) -> float:
        """The discriminator optimizer's lr as a factor of the student's."""
        return 1.0

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
