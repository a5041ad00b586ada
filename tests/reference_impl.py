"""Plain, hook-free recomputation of ONE training step of the released CAKD code.

Written only from `docs/reference.md` (sections "Taps", "Projectors",
"Discriminator", "Losses of one step"). It is deliberately slow and literal:
explicit functional ops, per-head Python loops, a Python loop over the groups of the
group-wise projector, and a functional PatchGAN. It imports nothing from `cakd`.

Notes for test writers
- `reference_losses` runs the student in whatever mode it is in (train mode updates its
  BatchNorm running stats) and updates the discriminator's BatchNorm running stats exactly as
  the module would (two train-mode calls). Clone/deepcopy models if you compare two runs.
- `p_fake` is shared by `disc` and `adv` (spec: D is called twice per step, real then fake).
  Calling `out["total"].backward()` and then `out["disc"].backward()` therefore needs
  `retain_graph=True` on the first call (or use `torch.autograd.grad(..., retain_graph=True)`).
- The spec's PatchGAN needs maps of side >= 24, i.e. a token grid of at least 5x5. A 64x64 input
  with 16x16 patches (4x4 grid, 16x16 maps) is too small for it; use `make_small_pair(
  image_size=96)` (6x6 grid, resnet18 layer3 is 6x6) or the 224/32 pair (7x7 grid, layer4).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer


# ----------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------
def make_patchgan():
    """PatchGAN of the spec's "Discriminator" section, pix2pix key layout (spec, last section):
    model.{0,2,5,8,11} convs, model.{3,6,9} BatchNorm2d, model.{1,4,7,10} LeakyReLU(0.2);
    AdaptiveAvgPool2d(1) applied after `model` -> one logit per map, shape (B, 1, 1, 1)."""

    class PatchGAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(
                nn.Conv2d(1, 8, kernel_size=4, stride=2, padding=1, bias=True),    # 0
                nn.LeakyReLU(0.2, True),                                           # 1
                nn.Conv2d(8, 16, kernel_size=4, stride=2, padding=1, bias=False),  # 2
                nn.BatchNorm2d(16),                                                # 3
                nn.LeakyReLU(0.2, True),                                           # 4
                nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1, bias=False), # 5
                nn.BatchNorm2d(32),                                                # 6
                nn.LeakyReLU(0.2, True),                                           # 7
                nn.Conv2d(32, 64, kernel_size=4, stride=1, padding=1, bias=False), # 8
                nn.BatchNorm2d(64),                                                # 9
                nn.LeakyReLU(0.2, True),                                           # 10
                nn.Conv2d(64, 1, kernel_size=4, stride=1, padding=1, bias=True),   # 11
            )
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.model(x))

    return PatchGAN()


def make_small_pair(num_classes=10, seed=0, image_size=64, patch_size=16):
    """resnet18(num_classes) student (train mode) + VisionTransformer(image_size, patch_size,
    num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes) teacher in eval mode,
    fixed seed.

    torchvision zero-initialises the ViT head and several biases (class token, in_proj/out_proj
    biases, heads.head), which would make z_T == 0 and hide bugs, so every teacher parameter is
    perturbed by seeded Gaussian noise (std 0.05). Defaults follow the brief (64x64, /16 -> 4x4
    grid); note the 4x4 grid gives 16x16 maps, too small for the spec's PatchGAN (see module doc).
    """
    torch.manual_seed(seed)
    student = torchvision.models.resnet18(num_classes=num_classes)
    teacher = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=2,
                                num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    return student, teacher


# ----------------------------------------------------------------------------------------------
# Pieces of the step
# ----------------------------------------------------------------------------------------------
def split_heads_loop(x, num_heads):
    """(B, N, h*d) -> list of h tensors (B, N, d); head i is columns i*d:(i+1)*d, i.e. the spec's
    head split (B, N, h*d) -> (B, h, N, d) (same as nn.MultiheadAttention's)."""
    d = x.shape[-1] // num_heads
    assert d * num_heads == x.shape[-1]
    return [x[:, :, i * d:(i + 1) * d] for i in range(num_heads)]


def teacher_forward(teacher, images):
    """Spec "Taps" (teacher). Explicit torchvision ViT forward with the LAST encoder block done
    by hand. Returns X, per-head pre-softmax scores, Y, z_T, t_T, f_T, A_T_qk, A_T_vv."""
    assert not teacher.training, "teacher must be in eval mode (dropout = identity)"
    enc = teacher.encoder
    with torch.no_grad():
        x = teacher._process_input(images)                                  # (B, N, D)
        B = x.shape[0]
        cls_tok = teacher.class_token.expand(B, -1, -1)
        h = torch.cat([cls_tok, x], dim=1)                                   # (B, 1+N, D)
        h = h + enc.pos_embedding
        h = enc.dropout(h)                                                   # identity in eval
        for blk in list(enc.layers)[:-1]:
            h = blk(h)

        # ---- last block by hand ----
        blk = enc.layers[-1]
        attn = blk.self_attention
        nh = attn.num_heads
        D = h.shape[-1]
        hd = D // nh
        X = blk.ln_1(h)                                                      # spec: X = ln_1 out
        qkv = X @ attn.in_proj_weight.T + attn.in_proj_bias                  # spec: Q,K,V
        Q, K, V = qkv.chunk(3, dim=-1)
        Qh, Kh, Vh = split_heads_loop(Q, nh), split_heads_loop(K, nh), split_heads_loop(V, nh)
        scores, vv, outs = [], [], []
        for i in range(nh):
            s = Qh[i] @ Kh[i].transpose(1, 2) / math.sqrt(hd)                # (B, 1+N, 1+N)
            scores.append(s)
            vv.append(Vh[i] @ Vh[i].transpose(1, 2))                         # NOT scaled
            outs.append(torch.softmax(s, dim=-1) @ Vh[i])                    # (B, 1+N, hd)
        o = torch.cat(outs, dim=-1)                                          # concat heads
        o = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
        o = blk.dropout(o)
        h = o + h                                                            # residual
        h = h + blk.mlp(blk.ln_2(h))                                         # ln_2, mlp, residual
        Y = enc.ln(h)                                                        # spec: Y
        z_T = teacher.heads(Y[:, 0])

        A_T_qk = torch.stack(scores, 0).mean(0)[:, 1:, 1:]                  # mean over heads,
        A_T_vv = torch.stack(vv, 0).mean(0)[:, 1:, 1:]                      # drop class token
    return dict(X=X, scores=scores, Y=Y, z_T=z_T, t_T=Y[:, 0], f_T=Y[:, 1:],
                A_T_qk=A_T_qk, A_T_vv=A_T_vv, head_dim=hd, num_heads=nh)


def student_forward(student, images, grid):
    """Spec "Taps" (student): conv1, bn1, relu, maxpool, layer1..4, avgpool, flatten, fc.
    F = the stage whose spatial size equals the teacher grid (layer3 for /16, layer4 for /32)."""
    x = student.conv1(images)
    x = student.bn1(x)
    x = student.relu(x)
    x = student.maxpool(x)
    x = student.layer1(x)
    x = student.layer2(x)
    x3 = student.layer3(x)
    x4 = student.layer4(x3)
    if tuple(x3.shape[-2:]) == (grid, grid):
        Fmap = x3
    elif tuple(x4.shape[-2:]) == (grid, grid):
        Fmap = x4
    else:
        raise ValueError(f"no student stage with a {grid}x{grid} grid: layer3 {tuple(x3.shape)}, "
                         f"layer4 {tuple(x4.shape)}")
    P = torch.flatten(student.avgpool(x4), 1)                                # (B, 2048)
    z_S = student.fc(P)
    return Fmap, P, z_S


def attention_projector(S, qkv_weight, pca_heads):
    """Spec "Projectors", attention projector: bias-free Linear -> q, k, v (chunk order q,k,v);
    A_S_qk = mean_h(q_h k_h^T) * d**-0.5, A_S_vv = mean_h(v_h v_h^T) * d**-0.5 (before softmax)."""
    d = qkv_weight.shape[0] // 3 // pca_heads
    assert 3 * pca_heads * d == qkv_weight.shape[0]
    qkv = F.linear(S, qkv_weight)                                            # no bias
    q, k, v = qkv.chunk(3, dim=-1)
    qh, kh, vh = split_heads_loop(q, pca_heads), split_heads_loop(k, pca_heads), \
        split_heads_loop(v, pca_heads)
    qk = [qh[i] @ kh[i].transpose(1, 2) for i in range(pca_heads)]
    vv = [vh[i] @ vh[i].transpose(1, 2) for i in range(pca_heads)]
    A_S_qk = torch.stack(qk, 0).mean(0) * d ** -0.5
    A_S_vv = torch.stack(vv, 0).mean(0) * d ** -0.5
    return A_S_qk, A_S_vv


def group_token_indices(grid, window):
    """Spec "Projectors", group-wise: windows of window x window tokens, ceil(grid/window) a side,
    edge windows smaller; groups row-major over windows (g = wr*nw + wc); token = row*grid+col."""
    nw = math.ceil(grid / window)
    groups = []
    for wr in range(nw):
        for wc in range(nw):
            idx = []
            for r in range(wr * window, min((wr + 1) * window, grid)):
                for c in range(wc * window, min((wc + 1) * window, grid)):
                    idx.append(r * grid + c)
            groups.append(idx)
    return groups


def group_projector(S, gl_weights, gl_biases, grid, window):
    """f_S[:, i] = Linear_g(S[:, i]) for every token i of group g; built token by token."""
    groups = group_token_indices(grid, window)
    assert len(gl_weights) == len(groups) == len(gl_biases), (len(gl_weights), len(groups))
    N = S.shape[1]
    tokens = [None] * N
    for g, idx in enumerate(groups):
        out = F.linear(S[:, idx], gl_weights[g], gl_biases[g])               # (B, |g|, D_T)
        for j, i in enumerate(idx):
            assert tokens[i] is None
            tokens[i] = out[:, j]
    assert all(t is not None for t in tokens)
    return torch.stack(tokens, dim=1)                                        # (B, N, D_T)


def lam(epoch):
    """Spec: lam(e) = min(max(e - 25, 0) / 50, 0.2)."""
    return min(max(epoch - 25, 0) / 50, 0.2)


def _batch_norm_like_module(x, bn):
    """F.batch_norm in training mode on the module's buffers, with the module's momentum logic
    (num_batches_tracked += 1; momentum None -> cumulative average), as nn.BatchNorm2d does."""
    factor = 0.0
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=True, momentum=factor, eps=bn.eps)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def reference_losses(student, teacher, disc, qkv_weight, gl_weights, gl_biases, cls_weight, cls_bias,
                     images, targets, epoch, label_smoothing=0.0, pca_heads=16, window=4):
    """Spec "Losses of one step at epoch e". Returns a dict of tensors: cls, pca, gl, adv, disc,
    total, plus A_T_qk, A_T_vv, A_S_qk, A_S_vv, f_S, f_T, t_S, t_T, z_S, z_T, p_real, p_fake."""
    # ---- teacher (no grad) ----
    T = teacher_forward(teacher, images)
    N = T["A_T_qk"].shape[-1]
    grid = int(round(math.sqrt(N)))
    assert grid * grid == N

    # ---- student + projectors ----
    Fmap, P, z_S = student_forward(student, images, grid)
    S = Fmap.flatten(2).transpose(1, 2)                                      # (B, N, C)
    A_S_qk, A_S_vv = attention_projector(S, qkv_weight, pca_heads)
    f_S = group_projector(S, gl_weights, gl_biases, grid, window)
    t_S = F.linear(P, cls_weight, cls_bias)                                  # token projector

    # ---- discriminator, functional pix2pix layout (spec "Discriminator") ----
    m = disc.model

    def patchgan(x):
        x = F.leaky_relu(F.conv2d(x, m[0].weight, m[0].bias, stride=2, padding=1), 0.2)
        x = F.conv2d(x, m[2].weight, None, stride=2, padding=1)
        x = F.leaky_relu(_batch_norm_like_module(x, m[3]), 0.2)
        x = F.conv2d(x, m[5].weight, None, stride=2, padding=1)
        x = F.leaky_relu(_batch_norm_like_module(x, m[6]), 0.2)
        x = F.conv2d(x, m[8].weight, None, stride=1, padding=1)
        x = F.leaky_relu(_batch_norm_like_module(x, m[9]), 0.2)
        x = F.conv2d(x, m[11].weight, m[11].bias, stride=1, padding=1)
        return F.adaptive_avg_pool2d(x, 1)                                   # (B, 1, 1, 1)

    def l(p, real):
        target = torch.ones_like(p) if real else torch.zeros_like(p)
        return F.binary_cross_entropy_with_logits(p, target)

    p_real = patchgan(T["A_T_qk"][:, None].detach())                         # call 1: real
    p_fake = patchgan(A_S_qk[:, None].detach())                              # call 2: fake (quirk 2)

    # ---- losses ----
    mse = F.mse_loss                                                         # mean over all elems
    z_T, t_T, f_T = T["z_T"], T["t_T"], T["f_T"]
    A_T_qk, A_T_vv = T["A_T_qk"], T["A_T_vv"]
    L_cls = F.cross_entropy(z_S, targets, label_smoothing=label_smoothing)
    L_pca = 0.2 * mse(A_S_qk, A_T_qk) + 0.05 * mse(A_S_vv, A_T_vv)
    L_gl = mse(z_S, z_T) + mse(t_S, t_T) + 0.05 * mse(f_S, f_T)
    L_D = 0.5 * (l(p_real.detach(), True) + l(p_fake, False))                # quirk 1
    L_adv = 0.05 * l(p_real.detach(), True) + l(p_fake, True)
    total = L_cls + lam(epoch) * (L_pca + L_gl + L_adv)

    return dict(cls=L_cls, pca=L_pca, gl=L_gl, adv=L_adv, disc=L_D, total=total,
                A_T_qk=A_T_qk, A_T_vv=A_T_vv, A_S_qk=A_S_qk, A_S_vv=A_S_vv,
                f_S=f_S, f_T=f_T, t_S=t_S, t_T=t_T, z_S=z_S, z_T=z_T,
                p_real=p_real, p_fake=p_fake)


# ----------------------------------------------------------------------------------------------
# Test helpers
# ----------------------------------------------------------------------------------------------
def check_teacher_forward(teacher, images, atol=1e-5):
    """Asserts the hand-written last block matches torchvision: z_T == teacher(images) and the
    per-head softmax(scores) averaged over heads == nn.MultiheadAttention's averaged weights."""
    T = teacher_forward(teacher, images)
    with torch.no_grad():
        z_ref = teacher(images)
        # feed the same X through the module's attention to validate the head split
        attn = teacher.encoder.layers[-1].self_attention
        _, w_ref = attn(T["X"], T["X"], T["X"], need_weights=True, average_attn_weights=True)
    err_z = (T["z_T"] - z_ref).abs().max().item()
    assert err_z <= atol, f"manual teacher forward differs from teacher(images): {err_z}"
    w_mine = torch.stack([torch.softmax(s, -1) for s in T["scores"]], 0).mean(0)
    err_w = (w_mine - w_ref).abs().max().item()
    assert err_w <= atol, f"manual attention weights differ from MultiheadAttention: {err_w}"
    return err_z, err_w


def make_projector_params(C, D_T, P_dim, n_groups, pca_heads=16, head_dim=64, seed=0):
    """Random leaf tensors (requires_grad) for the three projectors."""
    g = torch.Generator().manual_seed(seed)
    qkv_weight = (torch.randn(3 * pca_heads * head_dim, C, generator=g) / math.sqrt(C)).requires_grad_()
    gl_weights = [(torch.randn(D_T, C, generator=g) / math.sqrt(C)).requires_grad_()
                  for _ in range(n_groups)]
    gl_biases = [(0.1 * torch.randn(D_T, generator=g)).requires_grad_() for _ in range(n_groups)]
    cls_weight = (torch.randn(D_T, P_dim, generator=g) / math.sqrt(P_dim)).requires_grad_()
    cls_bias = (0.1 * torch.randn(D_T, generator=g)).requires_grad_()
    return qkv_weight, gl_weights, gl_biases, cls_weight, cls_bias


# ----------------------------------------------------------------------------------------------
# Sanity run
# ----------------------------------------------------------------------------------------------
def _sanity_case(name, student, teacher, C, grid, window=4, batch=2, num_classes=10,
                 soft_targets=False, expect_group_sizes=None):
    print(f"=== {name} ===")
    torch.manual_seed(123)
    size = teacher.image_size
    images = torch.randn(batch, 3, size, size)
    if soft_targets:
        targets = torch.softmax(torch.randn(batch, num_classes), -1)
    else:
        targets = torch.randint(0, num_classes, (batch,))
    D_T = teacher.hidden_dim
    N = grid * grid

    err_z, err_w = check_teacher_forward(teacher, images)
    print(f"teacher manual vs torchvision: max|dz_T| = {err_z:.2e}, max|d attn weights| = {err_w:.2e}")

    groups = group_token_indices(grid, window)
    sizes = [len(g) for g in groups]
    print(f"grid {grid}x{grid}, window {window}: {len(groups)} groups of sizes {sizes}")
    if expect_group_sizes is not None:
        assert sizes == expect_group_sizes, sizes
    assert sorted(i for g in groups for i in g) == list(range(N))

    params = make_projector_params(C, D_T, student.fc.in_features, len(groups))
    qkv_weight, gl_weights, gl_biases, cls_weight, cls_bias = params
    disc = make_patchgan().train()
    disc_copy = copy.deepcopy(disc)
    student_copy = copy.deepcopy(student)

    out = reference_losses(student, teacher, disc, qkv_weight, gl_weights, gl_biases,
                           cls_weight, cls_bias, images, targets, epoch=40, label_smoothing=0.1)
    for k in ["cls", "pca", "gl", "adv", "disc", "total"]:
        print(f"  {k:5s} = {out[k].item():.6f}")

    # shapes
    B, K = batch, num_classes
    expect = dict(A_T_qk=(B, N, N), A_T_vv=(B, N, N), A_S_qk=(B, N, N), A_S_vv=(B, N, N),
                  f_S=(B, N, D_T), f_T=(B, N, D_T), t_S=(B, D_T), t_T=(B, D_T), z_S=(B, K),
                  z_T=(B, K), p_real=(B, 1, 1, 1), p_fake=(B, 1, 1, 1))
    for k, s in expect.items():
        assert tuple(out[k].shape) == s, (k, tuple(out[k].shape), s)
    for k in ["cls", "pca", "gl", "adv", "disc", "total"]:
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    print("  shapes ok")

    # total = cls + lam * (pca + gl + adv)
    recomposed = out["cls"] + 0.2 * (out["pca"] + out["gl"] + out["adv"])
    assert torch.allclose(out["total"], recomposed)

    # functional PatchGAN == module (outputs and running stats after the two train-mode calls)
    p_real_m = disc_copy(out["A_T_qk"][:, None])
    p_fake_m = disc_copy(out["A_S_qk"][:, None].detach())
    assert torch.allclose(p_real_m, out["p_real"], atol=1e-5)
    assert torch.allclose(p_fake_m, out["p_fake"], atol=1e-5)
    sd_f, sd_m = disc.state_dict(), disc_copy.state_dict()
    assert list(sd_f.keys()) == [
        "model.0.weight", "model.0.bias", "model.2.weight",
        "model.3.weight", "model.3.bias", "model.3.running_mean", "model.3.running_var",
        "model.3.num_batches_tracked", "model.5.weight",
        "model.6.weight", "model.6.bias", "model.6.running_mean", "model.6.running_var",
        "model.6.num_batches_tracked", "model.8.weight",
        "model.9.weight", "model.9.bias", "model.9.running_mean", "model.9.running_var",
        "model.9.num_batches_tracked", "model.11.weight", "model.11.bias"], list(sd_f.keys())
    for k in sd_f:
        assert torch.allclose(sd_f[k].float(), sd_m[k].float(), atol=1e-6), k
    assert int(sd_f["model.3.num_batches_tracked"]) == 2
    print("  functional PatchGAN == module (logits and BN running stats) ok")

    # student forward matches the module's own forward (same BN state before the call)
    with torch.no_grad():
        z_mod = student_copy(images)
    assert torch.allclose(z_mod, out["z_S"], atol=1e-5)

    student_params = [p for p in student.parameters()]
    proj_params = [qkv_weight, *gl_weights, *gl_biases, cls_weight, cls_bias]
    disc_params = list(disc.parameters())

    # adv alone: no gradient to student or projectors (quirk 2), but some to disc
    g_adv = torch.autograd.grad(out["adv"], student_params + proj_params + disc_params,
                                retain_graph=True, allow_unused=True)
    ns, npj = len(student_params), len(proj_params)
    assert all(g is None for g in g_adv[:ns + npj]), "adv must not reach student/projectors"
    assert any(g is not None and g.abs().sum() > 0 for g in g_adv[ns + npj:])
    print("  adv: no grad to student/projectors, non-zero grad to disc ok")

    # disc (L_D) alone: only the disc's parameters get gradient (fake map detached)
    g_d = torch.autograd.grad(out["disc"], student_params + proj_params + disc_params,
                              retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_d[:ns + npj])
    assert any(g is not None and g.abs().sum() > 0 for g in g_d[ns + npj:])
    # pca and the f_S part of gl reach the student's F stage (layer3 or layer4)
    F_stage = student.layer4 if C == student.fc.in_features else student.layer3
    for term in ("pca", "gl"):
        g = torch.autograd.grad(out[term], [qkv_weight, F_stage[0].conv1.weight],
                                retain_graph=True, allow_unused=True)
        assert g[1] is not None and g[1].abs().sum() > 0, term
    print("  disc: grad only to disc; pca/gl reach the student's F stage ok")

    # total.backward(): non-zero grads on student and projector params
    out["total"].backward()
    for name_, p in [("student.conv1.weight", student.conv1.weight),
                     ("student.layer3[0].conv1.weight", student.layer3[0].conv1.weight),
                     ("student.layer4[0].conv1.weight", student.layer4[0].conv1.weight),
                     ("student.fc.weight", student.fc.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name_
    for i, p in enumerate(proj_params):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"projector param {i}"
    n_zero = sum(1 for p in student_params if p.grad is None or p.grad.abs().sum() == 0)
    print(f"  total.backward(): student params with grad {len(student_params) - n_zero}/"
          f"{len(student_params)}, all {len(proj_params)} projector tensors non-zero ok")

    # lam(e) = 0 before epoch 26: total == cls
    out10 = reference_losses(copy.deepcopy(student_copy), teacher, make_patchgan(), qkv_weight,
                             gl_weights, gl_biases, cls_weight, cls_bias, images, targets,
                             epoch=10, label_smoothing=0.1)
    assert torch.equal(out10["total"], out10["cls"])
    print(f"  epoch 10: total == cls == {out10['cls'].item():.6f} ok")
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    assert [lam(e) for e in (0, 25, 26, 30, 35, 100)] == [0, 0, 0.02, 0.1, 0.2, 0.2]

    # (1) the brief's small pair at 64x64: 4x4 grid from resnet18 layer3, 1 group. The teacher
    #     taps and projectors work, but the spec's PatchGAN cannot take a 16x16 map.
    print("=== small pair 64x64 (4x4 grid, resnet18 layer3, 256 ch) ===")
    student, teacher = make_small_pair(num_classes=10, seed=0)
    images = torch.randn(2, 3, 64, 64)
    err_z, err_w = check_teacher_forward(teacher, images)
    print(f"teacher manual vs torchvision: max|dz_T| = {err_z:.2e}, max|d attn weights| = {err_w:.2e}")
    Fmap, P, z_S = student_forward(student, images, 4)
    assert Fmap.shape == (2, 256, 4, 4) and P.shape == (2, 512) and z_S.shape == (2, 10)
    print(f"groups: {[len(g) for g in group_token_indices(4, 4)]}")
    try:
        make_patchgan().train()(torch.zeros(2, 1, 16, 16))
        raise AssertionError("expected the PatchGAN to reject a 16x16 map")
    except RuntimeError as e:
        print(f"PatchGAN on a 16x16 map fails as expected: {str(e).splitlines()[0][:90]}")

    # (2) same small pair at 96x96: 6x6 grid from resnet18 layer3, 4 groups of 16, 8, 8, 4
    student, teacher = make_small_pair(num_classes=10, seed=0, image_size=96)
    _sanity_case("small pair 96x96 (6x6 grid, resnet18 layer3, 256 ch), hard targets",
                 student, teacher, C=256, grid=6, expect_group_sizes=[16, 8, 8, 4])

    # (3) 224 /32 teacher: 7x7 grid -> resnet18 layer4 (512 ch), 4 groups of 16, 12, 12, 9
    student, teacher = make_small_pair(num_classes=10, seed=1, image_size=224, patch_size=32)
    _sanity_case("224 /32 pair (7x7 grid, resnet18 layer4, 512 ch), soft targets",
                 student, teacher, C=512, grid=7, soft_targets=True,
                 expect_group_sizes=[16, 12, 12, 9])
    print("ALL SANITY CHECKS PASSED")
