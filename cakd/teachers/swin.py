"""The Swin family: torchvision's ``SwinTransformer``, v1 (Swin-T/S/B, and Swin-L, which
torchvision has the class but no builder for) and v2 (Swin-V2-T/S/B).

The token grid is the last stage's, which one attention window must cover (then its
attention, and so the score map, is global); the taps recompute the last block's scores from
its attention input with its own weights and position bias.
"""
import math

import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torchvision.models import SwinTransformer

from ..taps import FeatureTaps, head_mean_scores, module_name, profiled, split_heads, value_maps
from .base import TeacherFamily, TeacherTaps
from .registry import register_teacher_family


def swin_l(num_classes: int = 1000, **kwargs) -> SwinTransformer:
    """Swin-L (window 7), which torchvision has the class but no builder for: embed 192,
    depths 2-2-18-2, heads 6-12-24-48. Weights come from the official release through
    ``scripts/convert_weights.py``. Stochastic depth 0.2, unused by an eval-mode teacher."""
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=[7, 7],
        stochastic_depth_prob=0.2,
        num_classes=num_classes,
        **kwargs,
    )


def swin_grid(teacher: SwinTransformer, image_size: int, name=None) -> int:
    """The last stage's grid of a Swin teacher at ``image_size``, which its attention window
    must cover (then the attention, and so the score map, is global)."""
    out = functional_call(
        teacher.features,
        {k: torch.empty_like(v, device="meta") for k, v in teacher.features.state_dict(keep_vars=True).items()},
        (torch.empty(1, 3, image_size, image_size, device="meta"),),
    )
    height, width = out.shape[1:3]
    window = teacher.features[-1][-1].attn.window_size
    if height > window[0] or width > window[1]:
        raise ValueError(
            f"{name or 'the Swin teacher'}'s last stage is {height}x{width} at {image_size}x{image_size} input, larger than "
            f"its {window[0]}x{window[1]} attention window, so its attention is not global: use an input of at most "
            f"{32 * window[0]}x{32 * window[1]}"
        )
    return height


@register_teacher_family
class SwinFamily(TeacherFamily):
    model_class = SwinTransformer
    names = ("swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t", "swin_v2_s", "swin_v2_b")
    builders = {"swin_l": swin_l}
    converted = ("swin_l",)

    def build(self, name, num_classes=1000, image_size=224):
        """``image_size`` is not the architecture's: a Swin takes any input size (its window covers it or not)."""
        if name in self.builders:
            return self.builders[name](num_classes=num_classes)
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    def token_grid(self, model, image_size, name=None):
        return swin_grid(model, image_size, name)

    def taps(self, teacher, image_size, attention=True, tokens=True, qkv=False, fold="auto"):
        return SwinTaps(teacher, image_size, attention, tokens, qkv)


class SwinTaps(TeacherTaps):
    """Taps on a torchvision ``SwinTransformer`` teacher (v1 or v2) at ``image_size``.

    The same dict as :class:`~cakd.teachers.vit.ViTTaps`, from the last stage's last block,
    whose one attention window covers the whole last-stage grid (N tokens; at 224, 7x7 in a
    7x7 window): the maps are the block's own pre-softmax scores (v1: ``q k^T / sqrt(d)``; v2:
    cosine similarity times its logit scale), relative position bias included, recomputed from
    the block's attention input with its own weights (:func:`swin_scores`). ``attn_qk`` is
    their head mean; ``attn_vv`` the head mean of the unscaled ``v v^T``; ``patch_tokens`` the
    final norm's output (B, N, D) and ``cls_token`` the pooled token the head reads.
    """

    def __init__(self, teacher: nn.Module, image_size: int, attention: bool = True, tokens: bool = True, qkv: bool = False):
        self.teacher = teacher
        self.runner = teacher
        self.attention = attention
        self.qkv = qkv
        self.attn = teacher.features[-1][-1].attn
        self.image_size = image_size
        self.grid = swin_grid(teacher, image_size)
        self.width, self.num_heads = teacher.head.in_features, self.attn.num_heads
        self._attn = module_name(teacher, self.attn) if attention or qkv else None
        self.tokens = tokens
        inputs = ([self._attn] if self._attn else []) + (["head"] if tokens else [])
        self.taps = FeatureTaps(teacher, outputs=["norm"] if tokens else [], inputs=inputs)

    def __call__(self, images):
        logits = self.runner(images)
        out = {"logits": logits}
        if self.tokens:
            out["patch_tokens"] = self.taps.pop("norm").flatten(1, 2)
            out["cls_token"] = self.taps.pop("head")
        if self._attn is not None:
            with profiled("cakd.teacher_maps"):
                self._maps(self.taps.pop(self._attn), out)
        return out

    def _maps(self, x, out):
        q, k, v, real = swin_qkv(x, self.attn)
        scores = swin_scores(q, k, self.attn)
        heads = self.num_heads
        if self.attention:
            out["attn_qk"] = scores[:, :, real][:, :, :, real].mean(dim=1)
            v_real = v[:, real]
            out["attn_vv"] = head_mean_scores(v_real, v_real, heads, 1.0)
        if self.qkv:
            out["q"], out["k"], out["v"] = q[:, real], k[:, real], v[:, real]
            out["attn_out"] = (scores.softmax(dim=-1) @ split_heads(v, heads))[:, :, real]
            out["value_maps"] = value_maps(v[:, real], heads)


def swin_qkv(x: torch.Tensor, attn: nn.Module):
    """q, k, v (B, W, h*d) of the window tokens, from the input ``x`` (B, H, W, C) of the
    window attention ``attn``, padded at the bottom and right to one window as the block pads
    it; and the indices of the grid's own tokens among the window's (row-major). Swin v2
    projects with no key bias, as its forward does."""
    _, height, width, channels = x.shape
    window_h, window_w = attn.window_size
    x = nn.functional.pad(x, (0, 0, 0, window_w - width, 0, window_h - height)).flatten(1, 2)
    bias = attn.qkv.bias
    if bias is not None and hasattr(attn, "logit_scale"):
        bias = torch.cat([bias[:channels], torch.zeros_like(bias[channels : 2 * channels]), bias[2 * channels :]])
    q, k, v = nn.functional.linear(x, attn.qkv.weight, bias).chunk(3, dim=-1)
    real = (torch.arange(height, device=x.device)[:, None] * window_w + torch.arange(width, device=x.device)).flatten()
    return q, k, v, real


def swin_scores(q, k, attn: nn.Module) -> torch.Tensor:
    """The window attention's per-head pre-softmax scores (B, h, W, W), as the block computes
    them: v1 ``q k^T / sqrt(d)``, v2 cosine similarity times ``exp(min(logit_scale, log 100))``,
    plus the relative position bias (v2: its continuous position bias) from the block's own
    ``get_relative_position_bias``."""
    heads = attn.num_heads
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    if hasattr(attn, "logit_scale"):
        scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
        scores = nn.functional.normalize(qh, dim=-1) @ nn.functional.normalize(kh, dim=-1).transpose(-2, -1) * scale
    else:
        scores = (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-2, -1)
    return scores + attn.get_relative_position_bias()
