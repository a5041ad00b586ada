import torch

import cakd
from cakd.projectors import AttentionProjector, GroupwiseLinearProjector, window_groups
from conftest import tiny_vit


def test_window_groups_14x14():
    groups = window_groups(14, 4)
    assert len(groups) == 16
    sizes = [len(g) for g in groups]
    assert sizes == [16, 16, 16, 8] * 3 + [8, 8, 8, 4]
    assert sorted(t for g in groups for t in g) == list(range(196))
    # group 3 is the top-right window: rows 0-3, cols 12-13
    assert groups[3] == [r * 14 + c for r in range(4) for c in (12, 13)]


def test_window_groups_7x7():
    groups = window_groups(7, 4)
    assert [len(g) for g in groups] == [16, 12, 12, 9]


def _manual_groupwise(proj, tokens):
    out = torch.zeros(tokens.shape[0], tokens.shape[1], proj.weight.shape[1])
    for g, index in enumerate(window_groups(proj.grid, 4)):
        out[:, index] = tokens[:, index] @ proj.weight[g].T + proj.bias[g]
    return out


def test_groupwise_batched_equals_loop_values_and_grads():
    torch.manual_seed(0)
    proj = GroupwiseLinearProjector(14, 48, 24)
    tokens = torch.randn(3, 196, 48, requires_grad=True)
    weight = torch.randn(3, 196, 24)
    grads = []
    for batched in (True, False):
        proj.batched = batched
        proj.zero_grad()
        tokens.grad = None
        out = proj(tokens)
        torch.testing.assert_close(out, _manual_groupwise(proj, tokens), rtol=1e-5, atol=1e-5)
        (out * weight).sum().backward()
        grads.append((tokens.grad.clone(), proj.weight.grad.clone(), proj.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_projector_is_head_mean_of_per_head_scores():
    torch.manual_seed(0)
    proj = AttentionProjector(32, num_heads=4, head_dim=8)
    tokens = torch.randn(2, 16, 32)
    qk, vv = proj(tokens)
    q, k, v = proj.to_qkv(tokens).chunk(3, -1)
    split = lambda x: x.view(2, 16, 4, 8).transpose(1, 2)  # noqa: E731
    ref_qk = (split(q) @ split(k).transpose(-1, -2)).mean(1) * 8**-0.5
    ref_vv = (split(v) @ split(v).transpose(-1, -2)).mean(1) * 8**-0.5
    torch.testing.assert_close(qk, ref_qk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vv, ref_vv, rtol=1e-5, atol=1e-6)


def test_shapes_follow_the_pair_vit_l16():
    """ViT-L/16 widths (1024-d tokens, 16 heads) at 224: 14x14 grid, 16 groups, 1024-d targets."""
    student = cakd.build_student("resnet50", num_classes=10)
    teacher = tiny_vit(image_size=224, patch_size=16, hidden_dim=1024, num_heads=16, num_layers=1)
    d = cakd.build_distiller("cakd", student, teacher)
    assert d.trainable.gl_proj.weight.shape == (16, 1024, 1024)
    assert d.trainable.cls_proj.weight.shape == (1024, 2048)
    out = d.trainable(torch.randn(1, 3, 224, 224))
    assert out["patch_tokens"].shape == (1, 196, 1024)
    assert out["attn_qk"].shape == (1, 196, 196)


def test_shapes_follow_the_pair_vit_b32():
    """A /32 teacher at 224: 7x7 grid, matched to layer4, 4 groups."""
    student = cakd.build_student("resnet18", num_classes=10)
    teacher = tiny_vit(image_size=224, patch_size=32, hidden_dim=48, num_heads=2)
    d = cakd.build_distiller("cakd", student, teacher)
    assert d.trainable.taps.stage == "layer4"
    assert d.trainable.gl_proj.num_groups == 4
    losses = d(torch.randn(2, 3, 224, 224), torch.tensor([0, 1]), epoch=40)
    assert all(torch.isfinite(v) for v in losses.values())
