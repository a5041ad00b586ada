"""The ViT family: torchvision's ``VisionTransformer`` (ViT-B/L/H) and DeiT-B.

The token grid is ``image_size / patch``; the taps read the last block's ``ln_1`` output and
recompute q, k, v with its ``in_proj`` weights, so it does not matter whether
``nn.MultiheadAttention`` takes its fused path.
"""
import math

import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import interpolate_embeddings

from ..taps import FeatureTaps, attention_output, folded_scores, head_mean_scores, module_name, profiled, value_maps
from .base import TeacherFamily, TeacherTaps
from .registry import register_teacher_family


def deit_b(num_classes: int = 1000, image_size: int = 224, **kwargs) -> VisionTransformer:
    """DeiT-B (Touvron et al. 2021, no distillation token): a ViT-B/16, whose weights come
    from the official release through ``scripts/convert_weights.py``."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=num_classes,
        **kwargs,
    )


def vit_grid(model: VisionTransformer, image_size: int, name=None) -> int:
    """``image_size / patch``; an image size that is not a multiple of the patch is refused
    in words (torchvision's ViT only asserts)."""
    patch = model.patch_size
    if image_size % patch:
        lower, upper = max(patch, image_size // patch * patch), (image_size // patch + 1) * patch
        raise ValueError(
            f"image size {image_size} is not a multiple of {name or 'the teacher'}'s patch size {patch}: "
            f"use a crop size such as {lower}" + (f" or {upper}" if upper != lower else "")
        )
    return image_size // patch


@register_teacher_family
class ViTFamily(TeacherFamily):
    model_class = VisionTransformer
    names = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "deit_b")
    builders = {"deit_b": deit_b}
    converted = ("deit_b",)

    def build(self, name, num_classes=1000, image_size=224):
        if name in self.builders:
            return self.builders[name](num_classes=num_classes, image_size=image_size)
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, image_size=image_size)

    def token_grid(self, model, image_size, name=None):
        return vit_grid(model, image_size, name)

    def adapt_state_dict(self, state, model, image_size):
        """Position embeddings interpolated when the weights were trained at another size."""
        return interpolate_embeddings(image_size, model.patch_size, state)

    def taps(self, teacher, image_size, attention=True, tokens=True, qkv=False, fold="auto"):
        if teacher.image_size != image_size:
            raise ValueError(
                f"the teacher was built for {teacher.image_size}x{teacher.image_size} but the images are "
                f"{image_size}x{image_size}: build it with image_size={image_size}"
            )
        return ViTTaps(teacher, attention, tokens, qkv, fold)


class ViTTaps(TeacherTaps):
    """Taps on a torchvision ``VisionTransformer`` teacher.

    ``__call__(images)`` runs the teacher and returns a dict with
    ``logits`` (B, K), ``cls_token`` (B, D) and ``patch_tokens`` (B, N, D) after the
    final LayerNorm, and, if ``attention=True``, the last block's head-mean
    ``attn_qk`` (pre-softmax q k^T / sqrt(d)) and ``attn_vv`` (unscaled v v^T),
    both (B, N, N) with the class token dropped (the released targets).

    ``qkv=True`` (the paper's attention projector) adds the last block's patch-token
    ``q``, ``k``, ``v`` (B, N, D), its per-head attention output ``attn_out``
    ``softmax(q_h k_h^T / sqrt(d)) v_h`` (B, h, N, d) and ``value_maps``
    ``v_h v_h^T / sqrt(d)`` (B, h, N, N), the class token dropped before the softmax.
    Only what is asked for is computed.

    ``fold`` (anything but ``"never"``): ``attn_qk`` comes from ``[x, 1] M [x, 1]^T`` with
    ``M`` (:func:`folded_in_proj`) computed once per teacher weight, so q and k are never
    projected; same maps to rounding.
    """

    def __init__(self, teacher: nn.Module, attention: bool = True, tokens: bool = True, qkv: bool = False,
                 fold: str = "auto"):
        self.teacher = teacher
        self.runner = teacher  # or its torch.compile wrapper
        self.attention = attention
        self.qkv = qkv
        self.fold = fold
        self._folded = (None, None)  # (key of the weights it was computed from, M)
        block = teacher.encoder.layers[-1]
        self.attn = block.self_attention
        self.image_size = teacher.image_size
        self.grid = vit_grid(teacher, teacher.image_size)
        self.width, self.num_heads = teacher.hidden_dim, self.attn.num_heads
        self._ln1 = module_name(teacher, block.ln_1) if attention or qkv else None
        self._ln = module_name(teacher, teacher.encoder.ln) if tokens else None
        self.taps = FeatureTaps(teacher, [name for name in (self._ln1, self._ln) if name])

    def __call__(self, images):
        logits = self.runner(images)
        out = {"logits": logits}
        if self._ln is not None:
            y = self.taps.pop(self._ln)
            out["cls_token"] = y[:, 0]
            out["patch_tokens"] = y[:, 1:]
        if self._ln1 is not None:
            with profiled("cakd.teacher_maps"):
                self._maps(self.taps.pop(self._ln1), out)
        return out

    def _maps(self, x, out):
        heads = self.attn.num_heads
        if self.attention and not self.qkv and self.fold != "never":
            patches = x[:, 1:]
            scale = 1.0 / math.sqrt(self.width // heads)
            out["attn_qk"] = folded_scores(nn.functional.pad(patches, (0, 1), value=1.0), self.folded_in_proj(), heads, scale)
            d = self.width
            v = nn.functional.linear(patches, self.attn.in_proj_weight[2 * d :], _bias(self.attn)[2 * d :])
            out["attn_vv"] = head_mean_scores(v, v, heads, 1.0)
            return
        q, k, v = vit_qkv(x, self.attn)
        if self.attention:
            out["attn_qk"], out["attn_vv"] = released_score_maps(q, k, v, heads)
        if self.qkv:
            out["q"], out["k"], out["v"] = q, k, v
            out["attn_out"] = attention_output(q, k, v, heads)
            out["value_maps"] = value_maps(v, heads)

    def folded_in_proj(self) -> torch.Tensor:
        """:func:`folded_in_proj` of the last block, recomputed only when its weights change
        (another tensor, or one updated in place: a load, ``.to()``)."""
        tensors = (self.attn.in_proj_weight, self.attn.in_proj_bias)
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._folded[0] != key:
            self._folded = (key, folded_in_proj(self.attn.in_proj_weight, _bias(self.attn)))
        return self._folded[1]


def _bias(attn: nn.MultiheadAttention) -> torch.Tensor:
    bias = attn.in_proj_bias
    return bias if bias is not None else attn.in_proj_weight.new_zeros(attn.in_proj_weight.shape[0])


@torch.no_grad()
def folded_in_proj(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``M`` (D+1, D+1) with ``[x, 1] M [y, 1]^T = q(x) . k(y)`` for ``nn.MultiheadAttention``'s
    packed ``in_proj`` (q, k, v rows; biases included exactly through the constant 1 column):
    ``M = [W_q, b_q]^T [W_k, b_k]``. In the weights' dtype, outside autocast."""
    d = weight.shape[0] // 3
    w_q = torch.cat([weight[:d], bias[:d, None]], dim=1)
    w_k = torch.cat([weight[d : 2 * d], bias[d : 2 * d, None]], dim=1)
    with torch.autocast(weight.device.type, enabled=False):
        return w_q.t() @ w_k


def vit_qkv(x: torch.Tensor, attn: nn.MultiheadAttention):
    """q, k, v (B, N, h*d) of the patch tokens, from the input ``x`` (B, 1+N, D) of ``attn``.

    Only the patch tokens are projected: each token's q, k, v depend on that token alone.
    """
    return nn.functional.linear(x[:, 1:], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)


def released_score_maps(q, k, v, num_heads: int):
    """The released targets: head-mean ``q k^T / sqrt(d)`` and unscaled ``v v^T``."""
    head_dim = q.shape[-1] // num_heads
    attn_qk = head_mean_scores(q, k, num_heads, 1.0 / math.sqrt(head_dim))
    attn_vv = head_mean_scores(v, v, num_heads, 1.0)
    return attn_qk, attn_vv


def vit_score_maps(x: torch.Tensor, attn: nn.MultiheadAttention):
    """The released teacher targets, from the input ``x`` (B, 1+N, D) of ``attn``.

    Dropping the class token's row and column after the maps gives the same maps as
    projecting the patch tokens alone.
    """
    return released_score_maps(*vit_qkv(x, attn), attn.num_heads)
