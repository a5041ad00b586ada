"""Projectors that turn student features into teacher-shaped targets.

Released forms (see ``reference.md``): the attention projector maps student tokens to
head-mean q k^T and v v^T score maps; the group-wise linear projector gives each
window of tokens its own Linear; the token projector maps the pooled feature to the
teacher's class token. The paper's form of the attention projector (Eq. 1-4: 3x3
convolutions, partial cross with the teacher's q, k, v, softmax attention outputs) is
:class:`PartialCrossAttentionProjector`.
"""
import math

import torch
from torch import nn

from .taps import attention_output, folded_scores, head_mean_scores, value_maps


class AttentionProjector(nn.Module):
    """Released "partially cross attention projector": one bias-free Linear to q, k, v.

    Returns ``(attn_qk, attn_vv)``, both ``mean_h(x_h y_h^T) * head_dim**-0.5`` before
    softmax. The released module's unused output projection is left out (it never
    received a gradient); :func:`cakd.weights` drops its keys on import.

    ``fold``: ``"auto"`` computes ``attn_qk`` as ``S (W_q^T W_k) S^T`` (:func:`folded_scores`)
    when that takes fewer FLOPs than projecting every token to q and k (a batch with more tokens
    than channels), ``"always"`` / ``"never"`` force either form. Same maps to rounding.
    """

    def __init__(self, in_dim: int, num_heads: int = 16, head_dim: int = 64, fold: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.fold = fold
        self.to_qkv = nn.Linear(in_dim, 3 * num_heads * head_dim, bias=False)

    def folds(self, tokens) -> bool:
        """Whether the folded form runs: its ``C*C*(h*d + B*N)`` multiply-adds (``W_q^T W_k``,
        then ``S`` times it) against ``2*B*N*C*h*d`` for q and k."""
        if self.fold != "auto":
            return self.fold == "always"
        rows, channels, width = tokens.shape[0] * tokens.shape[1], tokens.shape[2], self.num_heads * self.head_dim
        return channels * (width + rows) < 2 * rows * width

    def forward(self, tokens):
        if self.folds(tokens):
            w_q, w_k, w_v = self.to_qkv.weight.chunk(3)
            attn_qk = folded_scores(tokens, w_q.t() @ w_k, self.num_heads, self.scale)
            v = nn.functional.linear(tokens, w_v)
        else:
            q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
            attn_qk = head_mean_scores(q, k, self.num_heads, self.scale)
        attn_vv = head_mean_scores(v, v, self.num_heads, self.scale)
        return attn_qk, attn_vv

    def outputs(self, feature_map, tokens, teacher=None) -> dict:
        """What this projector adds to the student's outputs: ``attn_qk``, ``attn_vv`` from the
        tapped stage's ``tokens`` (``feature_map`` and ``teacher`` are not read)."""
        attn_qk, attn_vv = self(tokens)
        return {"attn_qk": attn_qk, "attn_vv": attn_vv}


def partial_cross(student: torch.Tensor, teacher: torch.Tensor, prob: float) -> torch.Tensor:
    """Eq. 3: each element takes the teacher's value with probability ``prob``, else keeps the student's.

    One uniform draw per element from torch's global generator (so a seeded or resumed
    run draws the same masks); the teacher's values are detached.
    """
    swap = torch.rand(student.shape, device=student.device) < prob
    return torch.where(swap, teacher.detach().to(student.dtype), student)


class PartialCrossAttentionProjector(nn.Module):
    """The paper's attention projector (Eq. 1-4), in the teacher's heads and widths.

    Three 3x3 convolutions (run as one, output channels ordered q, k, v) map the student
    feature map (B, C, H, W) to ``Q_S, K_S, V_S`` (B, H*W, h*d), tokens row-major. In
    training mode each element of Q, K and V is swapped for the teacher's with
    probability ``swap_prob`` (:func:`partial_cross`, masks drawn in the order q, k, v,
    each of shape (B, H*W, h*d)); in eval mode nothing is swapped. Returns a dict:

    - ``attn_out``: ``softmax(g(Q) g(K)^T / sqrt(d)) g(V)`` per head, (B, h, N, d);
    - ``value_maps``: ``V_S V_S^T / sqrt(d)`` per head, unswapped, (B, h, N, N);
    - ``attn_qk`` when ``score_map=True``: the head-mean pre-softmax ``Q_S K_S^T / sqrt(d)``
      (B, N, N), unswapped: the map a PatchGAN discriminator reads.
    """

    def __init__(self, in_channels: int, num_heads: int, head_dim: int, swap_prob: float = 0.5, score_map: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.swap_prob = swap_prob
        self.score_map = score_map
        self.to_qkv = nn.Conv2d(in_channels, 3 * num_heads * head_dim, kernel_size=3, padding=1)

    def outputs(self, feature_map, tokens, teacher=None) -> dict:
        """What this projector adds to the student's outputs: its dict, from the tapped stage's
        ``feature_map`` and the teacher's q, k, v (``tokens`` is not read)."""
        return self(feature_map, teacher)

    def forward(self, feature_map, teacher=None):
        q, k, v = self.to_qkv(feature_map).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        gq, gk, gv = q, k, v
        if self.training and self.swap_prob > 0:
            if teacher is None:
                raise ValueError("the partial cross attention projector needs the teacher's q, k, v in training mode")
            gq = partial_cross(q, teacher["q"], self.swap_prob)
            gk = partial_cross(k, teacher["k"], self.swap_prob)
            gv = partial_cross(v, teacher["v"], self.swap_prob)
        out = {"attn_out": attention_output(gq, gk, gv, self.num_heads), "value_maps": value_maps(v, self.num_heads)}
        if self.score_map:
            out["attn_qk"] = head_mean_scores(q, k, self.num_heads, self.head_dim**-0.5)
        return out

    def extra_repr(self):
        return f"heads={self.num_heads}, head_dim={self.head_dim}, swap_prob={self.swap_prob}"


def window_groups(grid: int, window: int = 4):
    """Token indices (row-major on the grid) of each window, windows numbered row-major.

    ``ceil(grid / window)`` windows a side; those on the bottom and right edge are smaller.
    """
    per_side = math.ceil(grid / window)
    groups = []
    for window_row in range(per_side):
        for window_col in range(per_side):
            rows = range(window_row * window, min((window_row + 1) * window, grid))
            cols = range(window_col * window, min((window_col + 1) * window, grid))
            groups.append([r * grid + c for r in rows for c in cols])
    return groups


class GroupwiseLinearProjector(nn.Module):
    """One ``Linear(in_dim, out_dim)`` per window of tokens (16 on a 14x14 grid).

    Weights are stored stacked, ``weight`` (G, out, in) and ``bias`` (G, out), each group
    initialised like its own ``nn.Linear``. ``batched=True`` runs all groups as one
    ``baddbmm`` over windows padded to the largest size; ``batched=False`` loops over
    groups. Both give the same numbers; the batched form is the faster one. ``dropout``
    (the paper's form; 0 in the released one) drops input tokens' channels before the FCs.
    """

    def __init__(self, grid: int, in_dim: int, out_dim: int, window: int = 4, batched: bool = True, dropout: float = 0.0):
        super().__init__()
        self.grid = grid
        self.batched = batched
        groups = window_groups(grid, window)
        self.num_groups = len(groups)
        self.weight = nn.Parameter(torch.empty(self.num_groups, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(self.num_groups, out_dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for g in range(self.num_groups):
            layer = nn.Linear(in_dim, out_dim)
            with torch.no_grad():
                self.weight[g].copy_(layer.weight)
                self.bias[g].copy_(layer.bias)
        size = max(len(tokens) for tokens in groups)
        order = [token for tokens in groups for token in tokens]
        # batched form: padded slot (g, s) -> token (padding repeats the group's first token),
        # and token -> its slot g * size + s
        padded = [tokens + tokens[:1] * (size - len(tokens)) for tokens in groups]
        slot = torch.empty(grid * grid, dtype=torch.long)
        for g, tokens in enumerate(groups):
            slot[torch.tensor(tokens)] = g * size + torch.arange(len(tokens))
        self.register_buffer("padded_index", torch.tensor(padded).flatten(), persistent=False)
        self.register_buffer("slot_index", slot, persistent=False)
        # loop form: tokens in group order, and back
        self.register_buffer("order_index", torch.tensor(order), persistent=False)
        self.register_buffer("unorder_index", torch.argsort(torch.tensor(order)), persistent=False)
        self.group_sizes = [len(tokens) for tokens in groups]
        self.window_size = size

    def forward(self, tokens):
        tokens = self.dropout(tokens)
        if self.batched:
            return self._forward_batched(tokens)
        return self._forward_loop(tokens)

    def _forward_batched(self, tokens):
        batch, _, in_dim = tokens.shape
        groups, size = self.num_groups, self.window_size
        # (B, G*S, C) -> (G, B*S, C): each group's tokens in one block of rows
        windows = tokens.index_select(1, self.padded_index).view(batch, groups, size, in_dim)
        windows = windows.transpose(0, 1).reshape(groups, batch * size, in_dim)
        # W_g x^T rather than x W_g^T: autograd then gives the weight's gradient in the weight's
        # own (G, out, in) layout, not transposed (which costs a copy of it every step)
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, windows.transpose(1, 2))  # (G, out, B*S)
        out = out.view(groups, -1, batch, size).permute(2, 0, 3, 1).reshape(batch, groups * size, -1)
        return out.index_select(1, self.slot_index)

    def _forward_loop(self, tokens):
        chunks = tokens.index_select(1, self.order_index).split(self.group_sizes, dim=1)
        outs = [nn.functional.linear(chunk, self.weight[g], self.bias[g]) for g, chunk in enumerate(chunks)]
        return torch.cat(outs, dim=1).index_select(1, self.unorder_index)

    def extra_repr(self):
        return f"grid={self.grid}, groups={self.num_groups}, in={self.weight.shape[2]}, out={self.weight.shape[1]}"
