"""Pictures of a run. Files (``scripts/summarize.py --plot``, ``scripts/attention_maps.py``)
are drawn with matplotlib, an optional extra (``pip install -e ".[plots]"``); the attention
maps written to TensorBoard during training need no matplotlib (:func:`map_grid`).
"""
import os

import numpy as np
import torch

from .report import UserError


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no screen), or one clear error."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('this picture needs matplotlib, an optional extra: pip install -e ".[plots]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi=100):
    """Write ``fig`` as a PNG (its folder created) and free it."""
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# viridis at five stops (matplotlib's), for the TensorBoard grid that must not need matplotlib
_VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32)


def _colour(values):
    """(H, W) values in 0..1 -> (H, W, 3) uint8, viridis; a non-finite value (a diverged
    model's map, which the checkpoint check then refuses) is grey."""
    finite = torch.isfinite(values)
    position = torch.where(finite, values, 0.0).clamp(0, 1) * (len(_VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(_VIRIDIS) - 2)
    weight = (position - low)[..., None]
    rgb = (_VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight).round().to(torch.uint8)
    return rgb.masked_fill(~finite[..., None], 128)


def map_grid(teacher_maps, student_maps, cell=128):
    """A (3, H, W) uint8 picture of maps (B, N, N) for TensorBoard's add_image, readable alone:
    column titles (teacher, student, |teacher - student|), one row per image, each map scaled up
    to about ``cell`` pixels, and beside the maps a colour bar with its two ends written on it:
    teacher and student of a row share one scale, the difference has its own from 0. Drawn with
    PIL (torchvision's own dependency), so training needs no matplotlib."""
    from PIL import Image, ImageDraw

    n = teacher_maps.shape[-1]
    side = n * max(1, cell // n)
    bar, label, gap, title = 10, 48, 6, 16
    x_teacher, x_student = 0, side + gap
    x_bar = x_student + side + 2
    x_diff = x_bar + bar + label + gap
    x_bar2 = x_diff + side + 2
    width, height = x_bar2 + bar + label, title + len(teacher_maps) * (side + gap)
    canvas = torch.full((height, width, 3), 255, dtype=torch.uint8)
    ramp = torch.linspace(1, 0, side)[:, None].expand(side, bar)  # colour bars: top is the high end
    labels = []
    for row, (t, s) in enumerate(zip(teacher_maps.float(), student_maps.float())):
        y = title + row * (side + gap)
        lo, hi = torch.minimum(t.min(), s.min()).item(), torch.maximum(t.max(), s.max()).item()
        diff = (t - s).abs()
        top = diff.max().item()
        cells = ((x_teacher, (t - lo) / max(hi - lo, 1e-12)), (x_student, (s - lo) / max(hi - lo, 1e-12)),
                 (x_diff, diff / max(top, 1e-12)))
        for x, values in cells:
            big = values.repeat_interleave(side // n, 0).repeat_interleave(side // n, 1)
            canvas[y : y + side, x : x + side] = _colour(big)
        for x, ends in ((x_bar, (hi, lo)), (x_bar2, (top, 0.0))):
            canvas[y : y + side, x : x + bar] = _colour(ramp)
            labels += [(x + bar + 2, y, f"{ends[0]:.3g}"), (x + bar + 2, y + side - 11, f"{ends[1]:.3g}")]
    image = Image.fromarray(canvas.numpy())
    draw = ImageDraw.Draw(image)
    for x, text in ((x_teacher, "teacher"), (x_student, "student"), (x_diff, "|teacher - student|")):
        draw.text((x + 2, 2), text, fill=(0, 0, 0))
    for x, y, text in labels:
        draw.text((x, y), text, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
