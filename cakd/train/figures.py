"""Pictures of a run. Files (``scripts/summarize.py --plot``, ``scripts/attention_maps.py``)
are drawn with matplotlib, an optional extra (``pip install -e ".[plots]"``); the attention
maps written to TensorBoard during training need no matplotlib (:func:`map_grid`).
"""
import os

import torch
from torch.nn import functional as F

from .errors import UserError


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


def map_grid(teacher_maps, student_maps, cell=None):
    """A (3, H, W) uint8 image of maps (B, N, N): one row per image, columns teacher | student |
    |difference|, each cell scaled to 0..1 (teacher and student of a row on their joint range,
    the difference on its own) in grey, a white line between cells. For TensorBoard's add_image."""
    rows = []
    for t, s in zip(teacher_maps.float(), student_maps.float()):
        lo, hi = torch.minimum(t.min(), s.min()), torch.maximum(t.max(), s.max())
        diff = (t - s).abs()
        cells = [(t - lo) / (hi - lo).clamp_min(1e-12), (s - lo) / (hi - lo).clamp_min(1e-12), diff / diff.max().clamp_min(1e-12)]
        cells = [F.pad(c, (1, 1, 1, 1), value=1.0) for c in cells]
        rows.append(torch.cat(cells, dim=1))
    grid = torch.cat(rows, dim=0)
    if cell is not None:
        grid = F.interpolate(grid[None, None], scale_factor=max(1, cell // teacher_maps.shape[-1]), mode="nearest")[0, 0]
    return (grid * 255).round().to(torch.uint8).expand(3, -1, -1).contiguous()
