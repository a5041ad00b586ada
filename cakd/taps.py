"""Forward-hook taps: read intermediate outputs of unmodified torchvision models.

The released code copied edited ``resnet.py``, ``vision_transformer.py`` and
``functional.py`` over the installed libraries to return extra tensors. Here the
models stay stock; hooks keep the outputs we need, and the one tensor no module
returns (the teacher's attention score maps) is recomputed from the last block's
``ln_1`` output and its ``in_proj`` weights, so it does not matter whether
``nn.MultiheadAttention`` takes its fused path.
"""
import math
import weakref

import torch
from torch import nn


def _remove_all(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


class FeatureTaps:
    """Keeps the forward output of named submodules of ``model`` in ``self.outputs``.

    Handles are removed by :meth:`remove`, and also when the taps object is
    garbage-collected, so a dropped distiller leaves no hook behind.
    """

    def __init__(self, model: nn.Module, names):
        self.outputs = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                raise ValueError(f"{type(model).__name__} has no submodule {name!r} to tap")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

    def _hook(self, name):
        outputs = self.outputs

        def hook(module, args, output):
            outputs[name] = output

        return hook

    def pop(self, name):
        """Return and forget a captured output (so no tensor outlives its step)."""
        try:
            return self.outputs.pop(name)
        except KeyError:
            raise RuntimeError(f"tap {name!r} captured nothing: was the model's forward called?") from None

    def remove(self):
        _remove_all(self._handles)
        self.outputs.clear()

    @property
    def active(self):
        return len(self._handles) > 0


def head_mean_scores(a: torch.Tensor, b: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """``mean_h(a_h @ b_h^T) * scale`` for (B, N, h*d) inputs, as one batched matmul.

    The sum over heads of per-head dot products is the dot product over all
    h*d channels, so the head mean is ``a @ b^T / h``.
    """
    return torch.bmm(a, b.transpose(1, 2)) * (scale / num_heads)


class ViTTaps:
    """Taps on a torchvision ``VisionTransformer`` teacher.

    ``__call__(images)`` runs the teacher and returns a dict with
    ``logits`` (B, K), ``cls_token`` (B, D) and ``patch_tokens`` (B, N, D) after the
    final LayerNorm, and, if ``attention=True``, the last block's head-mean
    ``attn_qk`` (pre-softmax q k^T / sqrt(d)) and ``attn_vv`` (unscaled v v^T),
    both (B, N, N) with the class token dropped.
    """

    def __init__(self, teacher: nn.Module, attention: bool = True, tokens: bool = True):
        self.teacher = teacher
        self.attention = attention
        block = teacher.encoder.layers[-1]
        self.attn = block.self_attention
        self._ln1 = _module_name(teacher, block.ln_1) if attention else None
        self._ln = _module_name(teacher, teacher.encoder.ln) if tokens else None
        self.taps = FeatureTaps(teacher, [name for name in (self._ln1, self._ln) if name])

    def __call__(self, images):
        logits = self.teacher(images)
        out = {"logits": logits}
        if self._ln is not None:
            y = self.taps.pop(self._ln)
            out["cls_token"] = y[:, 0]
            out["patch_tokens"] = y[:, 1:]
        if self.attention:
            x = self.taps.pop(self._ln1)
            out["attn_qk"], out["attn_vv"] = vit_score_maps(x, self.attn)
        return out

    def remove(self):
        self.taps.remove()


def vit_score_maps(x: torch.Tensor, attn: nn.MultiheadAttention):
    """The released teacher targets, from the input ``x`` (B, 1+N, D) of ``attn``.

    Only the patch tokens are projected: dropping the class token's row and column
    afterwards gives the same maps.
    """
    heads = attn.num_heads
    head_dim = attn.embed_dim // heads
    q, k, v = nn.functional.linear(x[:, 1:], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    attn_qk = head_mean_scores(q, k, heads, 1.0 / math.sqrt(head_dim))
    attn_vv = head_mean_scores(v, v, heads, 1.0)
    return attn_qk, attn_vv


class ResNetTaps:
    """Taps on a torchvision ResNet student: the stage ``stage`` (e.g. ``"layer3"``) as
    tokens (B, H*W, C), row-major, and the pooled feature (B, C') before ``fc``."""

    def __init__(self, student: nn.Module, stage: str):
        self.stage = stage
        self.taps = FeatureTaps(student, [stage, "avgpool"])

    def pop(self):
        feature = self.taps.pop(self.stage)
        pooled = self.taps.pop("avgpool")
        return feature.flatten(2).transpose(1, 2), pooled.flatten(1)

    def remove(self):
        self.taps.remove()


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")
