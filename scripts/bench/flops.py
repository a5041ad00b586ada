"""Floating-point operations per step of each mode, from ``torch.utils.flop_counter``: the
arithmetic a mode asks for, which its time ratio settles near on a device bound by arithmetic."""
import torch

from .modes import AMP_DTYPES, build_mode
from .profiling import eager


def cpu_attention_flops(query, key, value, *args, out_shape=None, products=2, **kwargs):
    """FLOPs of torch's fused CPU attention, which the flop counter does not know, counted as it
    counts the GPU's: ``products`` (N, d) x (d, M) products per head, 2 forward (q k^T, scores v)."""
    batch, heads, rows, width = query
    return products * 2 * batch * heads * rows * key[2] * width


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    """Backward: 5 products (the scores recomputed, then the gradients of scores, v, q and k)."""
    return cpu_attention_flops(query, key, value, products=5)


def count_flops(mode, student, teacher, images, targets, args, device, memory_format):
    """Floating-point operations of one eager step of ``mode`` (after one uncounted step), from
    ``torch.utils.flop_counter`` (matmuls, convolutions and attention, forward and backward;
    elementwise ops are not counted). MultiheadAttention's fused inference path is switched off
    while counting: the counter cannot see inside it, and the unfused path does the same products."""
    from torch.utils.flop_counter import FlopCounterMode

    amp_dtype = AMP_DTYPES[args.dtype]
    step, cleanup = build_mode(mode, student, teacher, eager(args), device, memory_format)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                     torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}
    try:
        step(images, targets, amp_dtype)
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            step(images, targets, amp_dtype)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        cleanup()
    return counter.get_total_flops()
