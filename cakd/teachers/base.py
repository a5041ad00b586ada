"""What a teacher family provides, written down once: the registry (``cakd.teachers.registry``), the
distillers and the trainer ask a family these things and nothing else, so a new family (in
this package or in a user's plug-in module) is one subclass of :class:`TeacherFamily`."""
from torch import nn


class TeacherTaps:
    """What :func:`cakd.teachers.registry.teacher_taps` returns: hooks on an unmodified teacher that
    read, in the one forward the logits take, what the distillers compare.

    Attributes:
        teacher: the model. ``runner``: what is called on the images, the teacher or its
            ``torch.compile`` wrapper (the distiller sets it).
        image_size: the input side the taps were made for; ``grid``: the side of the token
            grid at it (N = grid * grid tokens, row-major); ``width``: the tokens' width D;
            ``num_heads``: the heads h of the attention that gives the maps.
        attention: whether ``attn_qk`` / ``attn_vv`` are computed (the distiller may switch it
            on for one call); ``qkv``: whether ``q`` / ``k`` / ``v`` and what is derived from them are.

    ``__call__(images)`` returns a dict, computing only what was asked for:
        ``logits`` (B, K), always;
        ``cls_token`` (B, D), the pooled or class token the classifier head reads, and
        ``patch_tokens`` (B, N, D), the final norm's output, with ``tokens=True``;
        ``attn_qk`` (the head mean of the pre-softmax scores, position bias included where the
        block adds one) and ``attn_vv`` (the head mean of the unscaled ``v v^T``), both
        (B, N, N), with ``attention=True``;
        ``q``, ``k``, ``v`` (B, N, h*d), ``attn_out`` (per head ``softmax(scores) v``,
        (B, h, N, d)) and ``value_maps`` (per head ``v_h v_h^T / sqrt(d)``, (B, h, N, N)),
        with ``qkv=True``; every map over the N grid tokens (no class token, no padding).
    """

    teacher: nn.Module
    runner: nn.Module
    image_size: int
    grid: int
    width: int
    num_heads: int
    attention: bool
    qkv: bool

    def __call__(self, images) -> dict:
        raise NotImplementedError

    def remove(self):
        """Remove the hooks now (they also go when the taps object is garbage-collected)."""
        self.taps.remove()


class TeacherFamily:
    """A family of teachers sharing one model class, one grid rule and one kind of taps.

    Subclass it, set the class attributes, implement the methods, and decorate the class with
    :func:`cakd.teachers.registry.register_teacher_family`; the names then work wherever a teacher name
    does (``--teacher``, :func:`cakd.build_teacher`, a fine-tuned teacher as ``--model``).
    Weights are read by name the same way for every family (``cakd.zoo.load_state_dict``):
    None or ``"none"`` (random), a torchvision weights-enum member of the name, or a local
    ``.pth`` state dict.
    """

    model_class: type = nn.Module
    """The class its teachers are instances of: how :func:`cakd.teachers.registry.family_of` tells a
    built model's family (the family of the nearest class in the model's MRO wins)."""
    names: tuple = ()
    """Its teacher names, in the order ``--teacher`` lists them; none may be another family's."""
    builders: dict = {}
    """Its own builders (``name -> builder(num_classes=, ...)``) for the names torchvision has
    none for; those names have no torchvision weights."""
    converted: tuple = ()
    """Names whose weights ``scripts/convert_weights.py --arch NAME`` makes from the official
    release (its key renames); an error about their weights names that command."""

    def build(self, name: str, num_classes: int = 1000, image_size: int = 224) -> nn.Module:
        """A randomly initialised ``name`` for ``image_size`` inputs (on the current default device)."""
        raise NotImplementedError

    def token_grid(self, model: nn.Module, image_size: int, name=None) -> int:
        """The side of ``model``'s token grid at ``image_size`` (``model`` may be on the meta
        device, built for another size); a ValueError, in words, for a size it cannot take."""
        raise NotImplementedError

    def adapt_state_dict(self, state: dict, model: nn.Module, image_size: int) -> dict:
        """The weights hook: ``state`` (loaded for ``model``'s name, maybe trained at another
        size) made to fit ``model`` at ``image_size``. Unchanged by default."""
        return state

    def taps(self, teacher: nn.Module, image_size: int, attention: bool = True, tokens: bool = True,
             qkv: bool = False, fold: str = "auto") -> TeacherTaps:
        """The :class:`TeacherTaps` of ``teacher`` at ``image_size``. ``fold``: a family may
        compute ``attn_qk`` from a folded ``W_q^T W_k`` unless it is ``"never"``."""
        raise NotImplementedError
