"""Plain, hook-free recomputation of ONE training step of the released CAKD code.

Written only from `docs/reference.md` (sections "Taps", "Projectors", "Discriminator",
"Losses of one step", "Checkpoint layout"). It imports nothing from `cakd`, and it owns every
shape the spec fixes:

- the attention projector: one bias-free `Linear(C, 3*16*64)`, split into 16 heads of 64
  (`PCA_HEADS`, `PCA_HEAD_DIM`, the spec's numbers; the head count is not visible in the weight's
  shape, so the maps are computed with this split and a project that splits otherwise gives other
  numbers);
- the group-wise projector: one `Linear(C, D_T)` with bias per group, the groups from the spec's
  window rule (`GL_WINDOW` x `GL_WINDOW` windows, `ceil(grid / 4)` a side);
- the token projector `Linear(P, D_T)`;
- the PatchGAN, widths 1 -> 8 -> 16 -> 32 -> 64 -> 1 (`PATCHGAN_WIDTHS`), pix2pix key layout.

`C`, `P`, `D_T` and the grid are read from the torchvision student and teacher as the spec says
(`spec_dims`), never from the project's projector or discriminator modules. The project's state
enters only through `ReferenceCAKD.load_project_state`, which maps it to the spec's checkpoint
layout and copies it with strict key, shape and dtype checks (`SpecMismatch` otherwise).

It is deliberately slow and literal: explicit functional ops, per-head Python loops, a Python
loop over the groups of the group-wise projector, and a functional PatchGAN on the reference's own
module's tensors. Its self-checks are `tests/test_reference_impl.py`.

Notes for test writers
- `reference_losses` runs the student in whatever mode it is in (train mode updates its
  BatchNorm running stats) and updates the discriminator's BatchNorm running stats exactly as
  the module would (two train-mode calls). Give it its own copies of the models (made before the
  project puts its hooks on them: the reference refuses hooked models).
- `p_fake` is shared by `disc` and `adv` (spec: D is called twice per step, real then fake).
  Calling `out["total"].backward()` and then `out["disc"].backward()` therefore needs
  `retain_graph=True` on the first call (or use `torch.autograd.grad(..., retain_graph=True)`).
- The spec's PatchGAN needs maps of side >= 24, i.e. a token grid of at least 5x5. A 64x64 input
  with 16x16 patches (4x4 grid, 16x16 maps) is too small for it; use `make_small_pair(
  image_size=96)` (6x6 grid, resnet18 layer3 is 6x6) or the 224/32 pair (7x7 grid, layer4).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

# ----------------------------------------------------------------------------------------------
# The spec's numbers (docs/reference.md), written here once
# ----------------------------------------------------------------------------------------------
PCA_HEADS = 16           # "Projectors": 16 heads of 64
PCA_HEAD_DIM = 64
GL_WINDOW = 4            # "Projectors": windows of 4x4 tokens
PATCHGAN_WIDTHS = (1, 8, 16, 32, 64, 1)  # "Discriminator": Conv(1->8), (8->16), (16->32), (32->64), (64->1)
STAGE_OF_PATCH = {16: "layer3", 32: "layer4"}  # "Taps": F = layer3 on the 14x14 grid; 7x7 (/32): layer4
PCA_QK_WEIGHT, PCA_VV_WEIGHT = 0.2, 0.05  # "Losses": L_pca
FEATURE_WEIGHT = 0.05                     # L_gl's f_S term
ADV_REAL_WEIGHT = 0.05                    # L_adv's real term
DISC_WEIGHT = 0.5                         # L_D
PROJECTOR_PREFIXES = ("pca_proj.", "gl_proj.", "cls_proj.")


class SpecMismatch(AssertionError):
    """The project's state does not have the spec's keys or shapes."""


# ----------------------------------------------------------------------------------------------
# The reference's own modules
# ----------------------------------------------------------------------------------------------
def make_patchgan():
    """PatchGAN of the spec's "Discriminator" section, pix2pix key layout (spec, last section):
    model.{0,2,5,8,11} convs, model.{3,6,9} BatchNorm2d, model.{1,4,7,10} LeakyReLU(0.2);
    AdaptiveAvgPool2d(1) applied after `model` -> one logit per map, shape (B, 1, 1, 1)."""
    w0, w1, w2, w3, w4, w5 = PATCHGAN_WIDTHS  # 1, 8, 16, 32, 64, 1

    class PatchGAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(
                nn.Conv2d(w0, w1, kernel_size=4, stride=2, padding=1, bias=True),  # 0
                nn.LeakyReLU(0.2, True),                                           # 1
                nn.Conv2d(w1, w2, kernel_size=4, stride=2, padding=1, bias=False), # 2
                nn.BatchNorm2d(w2),                                                # 3
                nn.LeakyReLU(0.2, True),                                           # 4
                nn.Conv2d(w2, w3, kernel_size=4, stride=2, padding=1, bias=False), # 5
                nn.BatchNorm2d(w3),                                                # 6
                nn.LeakyReLU(0.2, True),                                           # 7
                nn.Conv2d(w3, w4, kernel_size=4, stride=1, padding=1, bias=False), # 8
                nn.BatchNorm2d(w4),                                                # 9
                nn.LeakyReLU(0.2, True),                                           # 10
                nn.Conv2d(w4, w5, kernel_size=4, stride=1, padding=1, bias=True),  # 11
            )
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.model(x))

    return PatchGAN()


class ReferenceProjectors(nn.Module):
    """The three projectors of the spec's "Projectors" section, keyed as the released checkpoint
    ("Checkpoint layout"): `pca_proj.to_qkv.weight` (3*16*64, C), `gl_proj.layers.fc_layer_{g}.
    {weight,bias}` ((D_T, C), (D_T,)) for each group g, `cls_proj.{weight,bias}` ((D_T, P), (D_T,)).
    The released `pca_proj.to_out` is never used (spec) and left out."""

    def __init__(self, C, P, D_T, num_groups):
        super().__init__()
        self.pca_proj = nn.Module()
        self.pca_proj.to_qkv = nn.Linear(C, 3 * PCA_HEADS * PCA_HEAD_DIM, bias=False)
        self.gl_proj = nn.Module()
        self.gl_proj.layers = nn.Module()
        for g in range(num_groups):
            self.gl_proj.layers.add_module(f"fc_layer_{g}", nn.Linear(C, D_T, bias=True))
        self.cls_proj = nn.Linear(P, D_T, bias=True)
        self.num_groups = num_groups

    def group_layers(self):
        return [getattr(self.gl_proj.layers, f"fc_layer_{g}") for g in range(self.num_groups)]


def spec_dims(student, teacher):
    """The widths the spec reads off the torchvision models ("Notation", "Taps"):
    grid = image_size / patch_size (14 for ViT-B/16 at 224), D_T = the teacher's width (768),
    F's stage (layer3 for /16, layer4 for /32) and its channels C (1024 for ResNet-50 layer3),
    P = the pooled width fed to `fc` (2048), and the groups of the window rule."""
    patch = teacher.patch_size
    grid = teacher.image_size // patch
    assert grid * patch == teacher.image_size
    stage = STAGE_OF_PATCH[patch]
    last_block = getattr(student, stage)[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2  # Bottleneck / BasicBlock
    groups = group_token_indices(grid, GL_WINDOW)
    return dict(grid=grid, stage=stage, C=last_conv.out_channels, P=student.fc.in_features,
                D_T=teacher.hidden_dim, groups=groups, num_groups=len(groups))


def assert_hook_free(model):
    """The reference runs plain modules: no forward/backward hooks anywhere in `model`."""
    for name, m in model.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                 getattr(m, "_backward_pre_hooks", {}))
        assert not any(hooks), (f"{type(model).__name__}.{name or '(root)'} carries hooks: give the "
                                f"reference a copy made before the project tapped the model")


# ----------------------------------------------------------------------------------------------
# The project's state -> the reference's modules (strict)
# ----------------------------------------------------------------------------------------------
def split_trainable_state(state):
    """The project's `trainable.state_dict()` (or a dict of its parameters' grads): the student's
    entries (prefix `student.` stripped) and the projector entries. Any other key is an error."""
    student, projectors, other = {}, {}, []
    for key, value in state.items():
        if key.startswith("student."):
            student[key[len("student."):]] = value
        elif key.startswith(PROJECTOR_PREFIXES):
            projectors[key] = value
        else:
            other.append(key)
    if other:
        raise SpecMismatch(f"trainable state has keys that are neither the student's nor a projector's: {other}")
    return student, projectors


def project_to_released(projectors, num_groups):
    """The project's projector entries -> the spec's checkpoint layout ("Checkpoint layout").

    The project keeps `pca_proj.to_qkv.weight` and `cls_proj.{weight,bias}` under the released
    names and stacks the group Linears as `gl_proj.weight` (G, D_T, C) and `gl_proj.bias` (G, D_T),
    group g in row g; the released layout has them as `gl_proj.layers.fc_layer_{g}.{weight,bias}`.
    G must be the spec's group count (window rule), checked here; other shapes are checked on load.
    """
    expected = {"pca_proj.to_qkv.weight", "gl_proj.weight", "gl_proj.bias", "cls_proj.weight", "cls_proj.bias"}
    if set(projectors) != expected:
        raise SpecMismatch(f"projector keys {sorted(projectors)} are not the released projectors' "
                           f"{sorted(expected)}")
    weight, bias = projectors["gl_proj.weight"], projectors["gl_proj.bias"]
    if weight.dim() != 3 or bias.dim() != 2 or weight.shape[0] != num_groups or bias.shape[0] != num_groups:
        raise SpecMismatch(f"group-wise projector: gl_proj.weight {tuple(weight.shape)}, gl_proj.bias "
                           f"{tuple(bias.shape)}, but the spec's window rule gives {num_groups} groups "
                           f"((G, D_T, C) and (G, D_T) with G = {num_groups})")
    released = {key: projectors[key] for key in ("pca_proj.to_qkv.weight", "cls_proj.weight", "cls_proj.bias")}
    for g in range(num_groups):
        released[f"gl_proj.layers.fc_layer_{g}.weight"] = weight[g]
        released[f"gl_proj.layers.fc_layer_{g}.bias"] = bias[g]
    return released


def check_state_fits(module, state, what):
    """Raise SpecMismatch unless `state` has exactly `module`'s keys, shapes and dtypes."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SpecMismatch(f"{what}: keys differ from the spec's: missing {missing}, unexpected {unexpected}")
    for key, ref in own.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise SpecMismatch(f"{what}: {key} has shape {tuple(got.shape)}, the spec's is {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise SpecMismatch(f"{what}: {key} is {got.dtype}, the reference's is {ref.dtype}")


def strict_copy(module, state, what):
    """Copy `state` into `module`'s own tensors after `check_state_fits`; `strict=True` as well."""
    check_state_fits(module, state, what)
    module.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)


class ReferenceCAKD:
    """One released CAKD step, with the reference's own projectors and PatchGAN.

    `student` and `teacher` are plain (hook-free) torchvision models the reference runs; its
    projectors and discriminator are built from the spec (`spec_dims`, the constants above),
    randomly initialised (seeded) until `load_project_state` copies the project's values in.
    """

    def __init__(self, student, teacher, seed=0):
        assert_hook_free(student)
        assert_hook_free(teacher)
        self.student, self.teacher = student, teacher
        self.dims = spec_dims(student, teacher)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.projectors = ReferenceProjectors(self.dims["C"], self.dims["P"], self.dims["D_T"],
                                                  self.dims["num_groups"])
            self.discriminator = make_patchgan().train()

    def load_project_state(self, trainable_state, discriminator_state):
        """Copy the project's state in, strictly: `trainable_state` is the distiller's
        `trainable.state_dict()` (student + projectors), `discriminator_state` its
        `discriminator.state_dict()` (pix2pix keys, BatchNorm buffers included)."""
        student_state, projector_state = split_trainable_state(trainable_state)
        strict_copy(self.student, student_state, "student")
        strict_copy(self.projectors, project_to_released(projector_state, self.dims["num_groups"]), "projectors")
        strict_copy(self.discriminator, discriminator_state, "discriminator")
        return self

    def __call__(self, images, targets, epoch, label_smoothing=0.0):
        assert_hook_free(self.student)
        assert_hook_free(self.teacher)
        return reference_losses(self.student, self.teacher, self.projectors, self.discriminator,
                                images, targets, epoch, label_smoothing, stage=self.dims["stage"])


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


def student_forward(student, images, grid, stage=None):
    """Spec "Taps" (student): conv1, bn1, relu, maxpool, layer1..4, avgpool, flatten, fc.
    F = the stage whose spatial size equals the teacher grid (layer3 for /16, layer4 for /32);
    when `stage` is given (the spec's choice, `spec_dims`), it must be that one."""
    x = student.conv1(images)
    x = student.bn1(x)
    x = student.relu(x)
    x = student.maxpool(x)
    x = student.layer1(x)
    x = student.layer2(x)
    x3 = student.layer3(x)
    x4 = student.layer4(x3)
    if tuple(x3.shape[-2:]) == (grid, grid):
        found, Fmap = "layer3", x3
    elif tuple(x4.shape[-2:]) == (grid, grid):
        found, Fmap = "layer4", x4
    else:
        raise ValueError(f"no student stage with a {grid}x{grid} grid: layer3 {tuple(x3.shape)}, "
                         f"layer4 {tuple(x4.shape)}")
    assert stage is None or stage == found, (stage, found)
    P = torch.flatten(student.avgpool(x4), 1)                                # (B, 2048)
    z_S = student.fc(P)
    return Fmap, P, z_S


def attention_projector(S, qkv_weight):
    """Spec "Projectors", attention projector: bias-free Linear C -> 3*16*64 -> q, k, v (chunk
    order q, k, v), each split into the spec's 16 heads of 64 (columns i*64:(i+1)*64);
    A_S_qk = mean_h(q_h k_h^T) * 64**-0.5, A_S_vv = mean_h(v_h v_h^T) * 64**-0.5 (before softmax)."""
    h, d = PCA_HEADS, PCA_HEAD_DIM
    assert tuple(qkv_weight.shape) == (3 * h * d, S.shape[-1]), tuple(qkv_weight.shape)
    qkv = F.linear(S, qkv_weight)                                            # no bias
    q, k, v = qkv.chunk(3, dim=-1)
    qh, kh, vh = split_heads_loop(q, h), split_heads_loop(k, h), split_heads_loop(v, h)
    assert all(x.shape[-1] == d for x in qh + kh + vh)
    qk = [qh[i] @ kh[i].transpose(1, 2) for i in range(h)]
    vv = [vh[i] @ vh[i].transpose(1, 2) for i in range(h)]
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


def group_projector(S, gl_weights, gl_biases, grid, window=GL_WINDOW):
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


def patchgan_forward(disc, x):
    """The spec's PatchGAN written out on `disc`'s own tensors (pix2pix indices), train-mode
    BatchNorm updating `disc`'s running stats as the module would. -> (B, 1, 1, 1)."""
    m = disc.model
    x = F.leaky_relu(F.conv2d(x, m[0].weight, m[0].bias, stride=2, padding=1), 0.2)
    x = F.conv2d(x, m[2].weight, None, stride=2, padding=1)
    x = F.leaky_relu(_batch_norm_like_module(x, m[3]), 0.2)
    x = F.conv2d(x, m[5].weight, None, stride=2, padding=1)
    x = F.leaky_relu(_batch_norm_like_module(x, m[6]), 0.2)
    x = F.conv2d(x, m[8].weight, None, stride=1, padding=1)
    x = F.leaky_relu(_batch_norm_like_module(x, m[9]), 0.2)
    x = F.conv2d(x, m[11].weight, m[11].bias, stride=1, padding=1)
    return F.adaptive_avg_pool2d(x, 1)                                       # (B, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def reference_losses(student, teacher, projectors, disc, images, targets, epoch, label_smoothing=0.0,
                     stage=None):
    """Spec "Losses of one step at epoch e", with the reference's own `projectors`
    (`ReferenceProjectors`) and `disc` (`make_patchgan()`). Returns a dict of tensors: cls, pca,
    gl, adv, disc, total, plus A_T_qk, A_T_vv, A_S_qk, A_S_vv, f_S, f_T, t_S, t_T, z_S, z_T,
    p_real, p_fake."""
    # ---- teacher (no grad) ----
    T = teacher_forward(teacher, images)
    N = T["A_T_qk"].shape[-1]
    grid = int(round(math.sqrt(N)))
    assert grid * grid == N

    # ---- student + projectors ----
    Fmap, P, z_S = student_forward(student, images, grid, stage)
    S = Fmap.flatten(2).transpose(1, 2)                                      # (B, N, C)
    A_S_qk, A_S_vv = attention_projector(S, projectors.pca_proj.to_qkv.weight)
    layers = projectors.group_layers()
    f_S = group_projector(S, [fc.weight for fc in layers], [fc.bias for fc in layers], grid, GL_WINDOW)
    t_S = F.linear(P, projectors.cls_proj.weight, projectors.cls_proj.bias)  # token projector

    # ---- discriminator (spec "Discriminator"), called twice in train mode ----
    def l(p, real):
        target = torch.ones_like(p) if real else torch.zeros_like(p)
        return F.binary_cross_entropy_with_logits(p, target)

    p_real = patchgan_forward(disc, T["A_T_qk"][:, None].detach())           # call 1: real
    p_fake = patchgan_forward(disc, A_S_qk[:, None].detach())                # call 2: fake (quirk 2)

    # ---- losses ----
    mse = F.mse_loss                                                         # mean over all elems
    z_T, t_T, f_T = T["z_T"], T["t_T"], T["f_T"]
    A_T_qk, A_T_vv = T["A_T_qk"], T["A_T_vv"]
    L_cls = F.cross_entropy(z_S, targets, label_smoothing=label_smoothing)
    L_pca = PCA_QK_WEIGHT * mse(A_S_qk, A_T_qk) + PCA_VV_WEIGHT * mse(A_S_vv, A_T_vv)
    L_gl = mse(z_S, z_T) + mse(t_S, t_T) + FEATURE_WEIGHT * mse(f_S, f_T)
    L_D = DISC_WEIGHT * (l(p_real.detach(), True) + l(p_fake, False))        # quirk 1
    L_adv = ADV_REAL_WEIGHT * l(p_real.detach(), True) + l(p_fake, True)
    total = L_cls + lam(epoch) * (L_pca + L_gl + L_adv)

    return dict(cls=L_cls, pca=L_pca, gl=L_gl, adv=L_adv, disc=L_D, total=total,
                A_T_qk=A_T_qk, A_T_vv=A_T_vv, A_S_qk=A_S_qk, A_S_vv=A_S_vv,
                f_S=f_S, f_T=f_T, t_S=t_S, t_T=t_T, z_S=z_S, z_T=z_T,
                p_real=p_real, p_fake=p_fake)
