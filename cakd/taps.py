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
from torchvision.models import SwinTransformer, VisionTransformer

from .models import token_grid


def _remove_all(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


class FeatureTaps:
    """Keeps the forward output of the named submodules ``outputs`` of ``model``, and the
    first forward argument of those named in ``inputs``, in ``self.outputs``.

    Handles are removed by :meth:`remove`, and also when the taps object is
    garbage-collected, so a dropped distiller leaves no hook behind.
    """

    def __init__(self, model: nn.Module, outputs=(), inputs=()):
        self.outputs = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in [*outputs, *inputs]:
            if name not in modules:
                raise ValueError(f"{type(model).__name__} has no submodule {name!r} to tap")
        for name in outputs:
            self._handles.append(modules[name].register_forward_hook(self._output_hook(name)))
        for name in inputs:
            self._handles.append(modules[name].register_forward_pre_hook(self._input_hook(name)))
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

    def _output_hook(self, name):
        outputs = self.outputs

        def hook(module, args, output):
            outputs[name] = output

        return hook

    def _input_hook(self, name):
        outputs = self.outputs

        def hook(module, args):
            outputs[name] = args[0]

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


def profiled(name: str):
    """A ``torch.profiler`` range naming one part of the step, so ``scripts/benchmark.py
    --profile`` can time it (its backward is matched to it by autograd sequence number)."""
    return torch.profiler.record_function(name)


def head_mean_scores(a: torch.Tensor, b: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """``mean_h(a_h @ b_h^T) * scale`` for (B, N, h*d) inputs, as one batched matmul.

    The sum over heads of per-head dot products is the dot product over all
    h*d channels, so the head mean is ``a @ b^T / h``.
    """
    return torch.bmm(a, b.transpose(1, 2)) * (scale / num_heads)


def folded_scores(x: torch.Tensor, m: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """``mean_h(q_h @ k_h^T) * scale`` for ``q = x W_q^T``, ``k = x W_k^T``, from ``m = W_q^T W_k``.

    The head mean is ``q k^T / h`` (:func:`head_mean_scores`) and ``q k^T = x (W_q^T W_k) x^T``:
    one (B*N, C) x (C, C) product instead of two (B*N, C) x (C, h*d) projections.
    """
    return torch.bmm(x @ m, x.transpose(1, 2)) * (scale / num_heads)


class ViTTaps:
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
        self.grid = token_grid(teacher, teacher.image_size)
        self.width, self.num_heads = teacher.hidden_dim, self.attn.num_heads
        self._ln1 = _module_name(teacher, block.ln_1) if attention or qkv else None
        self._ln = _module_name(teacher, teacher.encoder.ln) if tokens else None
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

    def remove(self):
        self.taps.remove()


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


class SwinTaps:
    """Taps on a torchvision ``SwinTransformer`` teacher (v1 or v2) at ``image_size``.

    The same dict as :class:`ViTTaps`, from the last stage's last block, whose one attention
    window covers the whole last-stage grid (N tokens; at 224, 7x7 in a 7x7 window): the
    maps are the block's own pre-softmax scores (v1: ``q k^T / sqrt(d)``; v2: cosine
    similarity times its logit scale), relative position bias included, recomputed from
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
        self.grid = token_grid(teacher, image_size)
        self.width, self.num_heads = teacher.head.in_features, self.attn.num_heads
        self._attn = _module_name(teacher, self.attn) if attention or qkv else None
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

    def remove(self):
        self.taps.remove()


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


def teacher_taps(teacher: nn.Module, image_size: int, attention: bool = True, tokens: bool = True, qkv: bool = False,
                 fold: str = "auto"):
    """:class:`ViTTaps` or :class:`SwinTaps` for ``teacher``; a ViT must be built for ``image_size``."""
    if isinstance(teacher, VisionTransformer):
        if teacher.image_size != image_size:
            raise ValueError(
                f"the teacher was built for {teacher.image_size}x{teacher.image_size} but the images are "
                f"{image_size}x{image_size}: build it with image_size={image_size}"
            )
        return ViTTaps(teacher, attention, tokens, qkv, fold)
    if isinstance(teacher, SwinTransformer):
        return SwinTaps(teacher, image_size, attention, tokens, qkv)
    raise TypeError(f"the teacher must be a torchvision VisionTransformer or SwinTransformer, got {type(teacher).__name__}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d), head i being channels i*d:(i+1)*d as in ``nn.MultiheadAttention``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def attention_output(q, k, v, num_heads: int) -> torch.Tensor:
    """Per-head ``softmax(q_h k_h^T / sqrt(d)) v_h`` for (B, N, h*d) inputs -> (B, h, N, d)."""
    return nn.functional.scaled_dot_product_attention(
        split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    )


def value_maps(v, num_heads: int) -> torch.Tensor:
    """Per-head ``v_h v_h^T / sqrt(d)`` for a (B, N, h*d) input -> (B, h, N, N)."""
    vh = split_heads(v, num_heads)
    return vh @ vh.transpose(-1, -2) * vh.shape[-1] ** -0.5


class StudentTaps:
    """Taps on a student: the output of the stage ``stage`` (e.g. ``"layer3"``), a feature
    map, and the input of the classifier head ``head`` (``fc``, ``classifier``): the pooled
    feature, before the head's dropout."""

    def __init__(self, student: nn.Module, stage: str, head: str):
        self.stage, self.head = stage, head
        self.taps = FeatureTaps(student, outputs=[stage], inputs=[head])

    def pop_map(self):
        """The stage output as a map (B, C, H, W), and the pooled feature (B, C')."""
        return self.taps.pop(self.stage), self.taps.pop(self.head)

    def remove(self):
        self.taps.remove()


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")
