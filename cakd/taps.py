"""Forward-hook taps: read intermediate outputs of unmodified torchvision models.

The released code copied edited ``resnet.py``, ``vision_transformer.py`` and
``functional.py`` over the installed libraries to return extra tensors. Here the
models stay stock; hooks keep the outputs we need, and the one tensor no module
returns (the teacher's attention score maps) is recomputed from the last block's
input with its own weights (each teacher family's taps, in ``cakd.teachers``), so it
does not matter whether ``nn.MultiheadAttention`` takes its fused path. This module
holds what they share: the hook capture, the head-mean and per-head maps, the
student's taps.
"""
import weakref

import torch
from torch import nn


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


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The name of the submodule ``target`` of ``root`` (a hook is placed by name)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")

