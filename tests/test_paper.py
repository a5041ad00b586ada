"""The paper's forms (paper.md) beside the released recipe: partial cross, multi-view
generator, MLP discriminator every n-th step, the adversarial gradient switch, the paper's
losses against a plain recomputation, the YAMLs, and the paper recipe under torchrun."""
import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cakd
from cakd.train.config import distiller_overrides, parse_args
from cakd.distillers import CAKDConfig, make_config
from cakd.train.engine import training_step
from cakd.multiview import TRANSFORMS, MultiViewGenerator
from cakd.projectors import PartialCrossAttentionProjector, partial_cross
from conftest import tiny_vit
from reference_impl import group_projector, make_small_pair, split_heads_loop, student_forward, teacher_forward
from test_train import small_flags, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = dict(  # configs/cakd_paper.yaml's distiller values
    pca_form="paper", pca_swap_prob=0.5, pca_qk_weight=1.0, pca_vv_weight=1.0, pca_loss_norm="relative",
    pca_lr_factor=0.01, gl_dropout=0.1, feature_weight=1.0, use_logits=True, logits_form="kd", kd_temperature=1.0,
    kd_alpha=0.5, use_token=False, use_cls=True, multiview_prob=0.5, disc_form="mlp",
    disc_every=5, disc_real_grad=True, disc_loss_weight=1.0, disc_lr_factor=0.01, adv_form="saturating",
    lambda_form="constant", lambda_constant=0.1, lambda_scope="adversarial", use_pca=True, use_adv=True,
)


def paper_distiller(student, teacher, **overrides):
    return cakd.build_distiller("cakd", student, teacher, **{**PAPER, **overrides})


# ---- partial cross (Eq. 3) ---------------------------------------------------------------------
def test_partial_cross_swaps_half_the_elements_and_detaches_the_teacher():
    torch.manual_seed(0)
    student = torch.zeros(4, 64, 256, requires_grad=True)
    teacher = torch.ones(4, 64, 256, requires_grad=True)
    mixed = partial_cross(student, teacher, 0.5)
    assert abs(mixed.mean().item() - 0.5) < 0.02  # 65536 draws: std 0.002
    (grad,) = torch.autograd.grad(mixed.sum(), [student])
    torch.testing.assert_close(grad, 1 - mixed.detach())  # kept elements only
    assert torch.autograd.grad(mixed.sum(), [teacher], allow_unused=True) == (None,)


def test_projector_swaps_in_training_only():
    torch.manual_seed(0)
    proj = PartialCrossAttentionProjector(16, num_heads=2, head_dim=8, swap_prob=0.5)
    feature = torch.randn(2, 16, 4, 4)
    teacher = {name: torch.randn(2, 16, 16) for name in "qkv"}
    proj.eval()
    clean = proj(feature)
    for key, value in proj(feature, teacher).items():  # eval: the teacher is ignored
        assert torch.equal(value, clean[key]), key
    proj.train()
    swapped = proj(feature, teacher)
    assert not torch.allclose(swapped["attn_out"], clean["attn_out"])
    assert torch.equal(swapped["value_maps"], clean["value_maps"])  # V_S V_S^T is never swapped
    with pytest.raises(ValueError, match="needs the teacher"):
        proj(feature)


# ---- multi-view generator (Eq. 7) ----------------------------------------------------------------
def test_multiview_changes_about_half_the_samples_and_nothing_else():
    torch.manual_seed(0)
    generator = MultiViewGenerator(0.5)
    images = torch.randn(2000, 3, 16, 16)
    views = generator(images)
    changed = (views != images).flatten(1).any(dim=1)
    assert abs(changed.float().mean().item() - 0.5) < 0.05
    assert torch.equal(views[~changed], images[~changed])  # untouched samples: bit for bit
    assert torch.isfinite(views).all()
    assert torch.equal(generator.eval()(images), images)  # eval: no views


MEAN_STD = [torch.tensor(v).view(1, 3, 1, 1) for v in (cakd.students.IMAGENET_MEAN, cakd.students.IMAGENET_STD)]


def test_multiview_draws_in_the_documented_order_and_clamps_as_torchvision():
    """Training views: the draws are the documented sequence of torch's global generator (so
    seeded and resumed runs repeat them); jitter is torchvision's adjust_brightness, _contrast,
    _saturation per sample; mask and noise as written; every view within [0, 1] pixels."""
    from torchvision.transforms.v2 import functional as TF

    B, H, W = 200, 12, 16
    mean, std = MEAN_STD
    torch.manual_seed(0)
    pixels = torch.rand(B, 3, H, W)
    images = (pixels - mean) / std
    torch.manual_seed(3)
    views = MultiViewGenerator(0.5).train()(images)
    after = torch.get_rng_state()

    torch.manual_seed(3)  # the documented draws, written out
    chosen, kind = torch.rand(B) < 0.5, torch.randint(5, (B,))  # kind: jitter, crop, rotate, mask, noise
    u = lambda low, high: low + (high - low) * torch.rand(B)  # noqa: E731
    [torch.rand(B) for _ in range(5)]  # crop: area, aspect, x, y; rotate: angle
    factors = [u(0.6, 1.4) for _ in range(3)]
    side_h, side_w = u(0.125, 0.5) * H, u(0.125, 0.5) * W
    top, left = u(0, 1) * (H - side_h), u(0, 1) * (W - side_w)
    noise = torch.randn(B, 3, H, W)
    assert torch.equal(torch.get_rng_state(), after)

    out = views * std + mean
    assert torch.equal(views[~chosen], images[~chosen])
    assert out[chosen].min() >= -1e-6 and out[chosen].max() <= 1 + 1e-6
    rows, cols = torch.arange(H).view(H, 1), torch.arange(W).view(1, W)
    for i in torch.nonzero(chosen).flatten().tolist():
        p = pixels[i]
        if kind[i] == 0:
            expected = TF.adjust_brightness(p, factors[0][i].item())
            expected = TF.adjust_saturation(TF.adjust_contrast(expected, factors[1][i].item()), factors[2][i].item())
        elif kind[i] == 3:
            inside = (rows >= top[i]) & (rows < top[i] + side_h[i]) & (cols >= left[i]) & (cols < left[i] + side_w[i])
            expected = torch.where(inside, 0.0, p)
        elif kind[i] == 4:
            expected = (p + 0.1 * noise[i]).clamp(0, 1)
        else:
            continue
        torch.testing.assert_close(out[i], expected, rtol=0, atol=2e-6)


def assert_views_seeded_per_image(protocol, names, size):
    """Every image of a batch viewed, in [0, 1], independently of its batch; torch's global
    generator untouched. Returns the views of images 10-15 under each name."""
    mean, std = MEAN_STD
    torch.manual_seed(0)
    images = (torch.rand(6, 3, size, size) - mean) / std
    views = {}
    for name in names:
        state = torch.get_rng_state()
        whole = protocol.view(images, name, range(10, 16))
        assert torch.equal(torch.get_rng_state(), state), name
        split = torch.cat([protocol.view(images[:2], name, [10, 11]), protocol.view(images[2:], name, range(12, 16))])
        assert torch.equal(whole, split), name  # an image's view does not depend on its batch
        assert (whole != images).flatten(1).any(dim=1).all(), name  # every image transformed
        pixels = whole * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5, name
        views[name] = whole
    return images, views


def test_eval_views_are_seeded_per_image_and_leave_the_global_generator_alone():
    generator = MultiViewGenerator()  # training mode or not: view() transforms every image
    images, views = assert_views_seeded_per_image(generator, TRANSFORMS, 16)
    for name, whole in views.items():
        assert torch.equal(whole, generator.view(images, name, range(10, 16))), name
        assert not torch.equal(whole, generator.view(images, name, range(10, 16), seed=1)), name
        assert not torch.equal(whole[:3], generator.view(images[:3], name, range(20, 23))), name


def test_evaluate_views_feeds_each_image_its_seeded_view():
    """The noisy evaluation: every image once clean and once per transform, image i with the
    view seeded by i; accuracies counted per pass, and their mean over the transforms."""
    from torch.utils.data import DataLoader, TensorDataset
    from cakd.train.engine import evaluate_views

    mean, std = MEAN_STD
    torch.manual_seed(0)
    images, targets = (torch.rand(7, 3, 8, 8) - mean) / std, torch.arange(7) % 3
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :3]  # 3 classes: top-5 is always 100

    loader = DataLoader(TensorDataset(images, targets), batch_size=3)
    results = evaluate_views(Probe(), loader, torch.device("cpu"), seed=2, protocol="train_views")
    passes = [torch.cat(seen[j::6]) for j in range(6)]  # 3 batches, each clean then the 5 views
    assert torch.equal(passes[0], images)
    for j, name in enumerate(TRANSFORMS, start=1):
        assert torch.equal(passes[j], MultiViewGenerator().view(images, name, range(7), seed=2)), name
        top1 = 100.0 * (passes[j].flatten(1)[:, :3].argmax(dim=1) == targets).double().mean().item()
        assert results[f"views_{name}_acc1"] == pytest.approx(top1) and results[f"views_{name}_acc5"] == 100.0
    assert results["views_mean_acc1"] == pytest.approx(sum(results[f"views_{n}_acc1"] for n in TRANSFORMS) / 5)
    # the default protocol: the corruptions, image i's seeded by i
    from cakd.corruptions import CORRUPTIONS, Corruptions

    seen.clear()
    results = evaluate_views(Probe(), loader, torch.device("cpu"), seed=2)
    passes = [torch.cat(seen[j::6]) for j in range(6)]
    for j, name in enumerate(CORRUPTIONS, start=1):
        assert torch.equal(passes[j], Corruptions().view(images, name, range(7), seed=2)), name
    assert set(results) == {"acc1", "acc5"} | {f"views_{n}_{k}" for n in CORRUPTIONS + ("mean",) for k in ("acc1", "acc5")}


def test_multiview_reaches_the_student_only(small_pair, batch):
    student, teacher = small_pair
    distiller = cakd.build_distiller("cakd", student, teacher, multiview_prob=1.0)
    seen = {}
    student.register_forward_pre_hook(lambda module, args: seen.__setitem__("student", args[0].clone()))
    teacher.register_forward_pre_hook(lambda module, args: seen.__setitem__("teacher", args[0].clone()))
    images, targets = batch
    original = images.clone()
    distiller.train()(images, targets, epoch=0)
    assert torch.equal(seen["teacher"], original) and torch.equal(images, original)
    assert (seen["student"] != original).flatten(1).any(dim=1).all()  # p = 1: every sample
    distiller.eval()(images, targets, epoch=0)
    assert torch.equal(seen["student"], original)


# ---- discriminator every n-th iteration --------------------------------------------------------
def test_mlp_discriminator_steps_every_nth_iteration(small_pair, batch):
    student, teacher = small_pair
    distiller = paper_distiller(student, teacher, disc_every=3, multiview_prob=0.0, gl_dropout=0.0)
    assert isinstance(distiller.discriminator, cakd.distillers.TokenMLP)
    optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=0.01)
    disc_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=0.1)
    images, targets = batch
    stepped = []
    for step in range(7):
        before_d = [p.detach().clone() for p in distiller.discriminator.parameters()]
        before_s = distiller.trainable.gl_proj.weight.detach().clone()
        losses = training_step(distiller, images, targets, 0, optimizer, disc_optimizer, global_step=step)
        assert "disc" in losses  # still logged when D does not step
        stepped.append(any(not torch.equal(a, b) for a, b in zip(before_d, distiller.discriminator.parameters())))
        assert not torch.equal(before_s, distiller.trainable.gl_proj.weight)  # the student steps every time
    assert stepped == [True, False, False, True, False, False, True]
    assert [distiller.disc_due(s) for s in range(7)] == stepped


# ---- adversarial gradient switch ---------------------------------------------------------------
@pytest.mark.parametrize("disc_form", ["mlp", "patchgan"])
def test_adversarial_gradient_reaches_the_projector_only_when_switched_on(disc_form):
    """mlp: through h'_S to the group-wise projector; patchgan: through the q k^T map to the
    paper's attention projector. Off (released form, no adv_to_student): exactly zero."""
    student, teacher = make_small_pair(image_size=96)  # 6x6 grid: the PatchGAN needs maps >= 24 wide
    images, targets = torch.randn(2, 3, 96, 96), torch.tensor([1, 2])
    common = dict(disc_form=disc_form, multiview_prob=0.0, gl_dropout=0.0)
    for adv_form, adv_to_student, on in [("released", False, False), ("released", True, True),
                                         ("saturating", False, True), ("non_saturating", False, True)]:
        torch.manual_seed(0)
        distiller = paper_distiller(copy.deepcopy(student), teacher, adv_form=adv_form, adv_to_student=adv_to_student, **common)
        t = distiller.trainable
        weight = t.gl_proj.weight if disc_form == "mlp" else t.pca_proj.to_qkv.weight
        torch.manual_seed(1)
        losses = distiller(images, targets, epoch=0)
        rest = losses["cls"] + losses["pca"] + losses["gl"]
        (g_total,) = torch.autograd.grad(losses["total"], [weight], retain_graph=True)
        (g_rest,) = torch.autograd.grad(rest, [weight], retain_graph=True)
        if on:
            (g_adv,) = torch.autograd.grad(losses["adv"], [weight], retain_graph=True)
            assert g_adv.abs().max() > 0, (adv_form, adv_to_student)
            torch.testing.assert_close(g_total - g_rest, 0.1 * g_adv, rtol=1e-4, atol=1e-4 * g_adv.abs().max().item())
        else:
            assert not losses["adv"].requires_grad
            assert torch.equal(g_total, g_rest)
        # the released update order works with the gradient on: D steps in place first
        disc_optimizer = torch.optim.SGD(distiller.discriminator.parameters(), lr=0.1)
        losses["disc"].backward(retain_graph=True)
        disc_optimizer.step()
        losses["total"].backward()


# ---- the paper's losses against a plain recomputation --------------------------------------------
def mlp_logit(tokens, weights):
    """The paper's discriminator, written out: per token 3 FC layers, LeakyReLU(0.2), mean over tokens."""
    (w0, b0), (w1, b1), (w2, b2) = weights
    h = F.leaky_relu(tokens @ w0.T + b0, 0.2)
    h = F.leaky_relu(h @ w1.T + b1, 0.2)
    return (h @ w2.T + b2).mean(dim=1)


def paper_losses(student, teacher, conv_w, conv_b, gl_w, gl_b, d_weights, images, targets, seed, use_logits, adv_form):
    """Eq. 1-10 with explicit per-head loops and softmax; the swap masks are drawn as the
    projector documents: torch's global generator, q then k then v, each (B, N, h*d)."""
    T = teacher_forward(teacher, images)
    heads, d = T["num_heads"], T["head_dim"]
    attn = teacher.encoder.layers[-1].self_attention
    Q_T, K_T, V_T = (T["X"][:, 1:] @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)  # class token dropped
    grid = int(math.isqrt(Q_T.shape[1]))
    Fmap, _, z_S = student_forward(student, images, grid)
    Q_S, K_S, V_S = F.conv2d(Fmap, conv_w, conv_b, padding=1).flatten(2).transpose(1, 2).chunk(3, dim=-1)
    torch.manual_seed(seed)
    g = [torch.where(torch.rand(M_S.shape) < 0.5, M_T, M_S) for M_S, M_T in ((Q_S, Q_T), (K_S, K_T), (V_S, V_T))]

    def attention(q, k, v):
        return [torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1) @ vh
                for qh, kh, vh in zip(split_heads_loop(q, heads), split_heads_loop(k, heads), split_heads_loop(v, heads))]

    def vv(v):
        return [vh @ vh.transpose(1, 2) / math.sqrt(d) for vh in split_heads_loop(v, heads)]

    def relative(student_side, teacher_side):  # our normalisation of Eq. 4's squared norms
        return ((student_side - teacher_side) ** 2).mean() / (teacher_side**2).mean()

    L_proj1 = relative(torch.stack(attention(*g)), torch.stack(attention(Q_T, K_T, V_T))) + \
        relative(torch.stack(vv(V_S)), torch.stack(vv(V_T)))
    S = Fmap.flatten(2).transpose(1, 2)
    h_S = group_projector(S, gl_w, gl_b, grid, 4)
    L_proj2 = F.mse_loss(h_S, T["f_T"])
    # the paper's "Logits", Hinton et al.'s KD at T = 1: KL(softmax(z_T) || softmax(z_S)), batch mean
    p_T = torch.softmax(T["z_T"], dim=1)
    L_kd = (p_T * (torch.log(p_T) - torch.log_softmax(z_S, dim=1))).sum(dim=1).mean()
    D_real, D_fake = torch.sigmoid(mlp_logit(T["f_T"], d_weights)), torch.sigmoid(mlp_logit(h_S.detach(), d_weights))
    L_D = (-torch.log(D_real) - torch.log(1 - D_fake)).mean()  # Eq. 8
    D_fake_student = torch.sigmoid(mlp_logit(h_S, d_weights))
    if adv_form == "saturating":
        L_MVG = torch.log(1 - D_fake_student).mean()  # Eq. 9
    else:
        L_MVG = -torch.log(D_fake_student).mean()
    L_cls = F.cross_entropy(z_S, targets)
    labels_and_logits = 0.5 * L_cls + 0.5 * L_kd if use_logits else L_cls  # KD's (1 - alpha) CE + alpha KL
    total = labels_and_logits + L_proj1 + L_proj2 + 0.1 * L_MVG  # Eq. 10, plus the labels and C1's KD
    return dict(cls=L_cls, kd=0.5 * L_kd, pca=L_proj1, gl=L_proj2, adv=L_MVG, disc=L_D, total=total)


@pytest.mark.parametrize("use_logits, adv_form", [(True, "saturating"), (False, "non_saturating")])  # the first: cakd_paper.yaml
def test_paper_losses_match_a_plain_recomputation(use_logits, adv_form):
    student, teacher = make_small_pair(image_size=96)  # 6x6 grid, 4 groups, 2 heads of 16
    reference_student = copy.deepcopy(student)
    # dropout and views are random beyond the swap masks: off here, tested on their own
    distiller = paper_distiller(student, teacher, gl_dropout=0.0, multiview_prob=0.0, use_logits=use_logits, adv_form=adv_form)
    t, disc = distiller.trainable, distiller.discriminator
    leaf = lambda x: x.detach().clone().requires_grad_()  # noqa: E731
    conv_w, conv_b = leaf(t.pca_proj.to_qkv.weight), leaf(t.pca_proj.to_qkv.bias)
    gl_w, gl_b = [leaf(w) for w in t.gl_proj.weight], [leaf(b) for b in t.gl_proj.bias]
    layers = [m for m in disc.mlp if isinstance(m, torch.nn.Linear)]
    d_weights = [(leaf(m.weight), leaf(m.bias)) for m in layers]
    torch.manual_seed(3)
    images, targets = torch.randn(2, 3, 96, 96), torch.tensor([1, 8])

    torch.manual_seed(11)
    ours = distiller(images, targets, epoch=0)
    ref = paper_losses(reference_student, teacher, conv_w, conv_b, gl_w, gl_b, d_weights, images, targets, 11, use_logits, adv_form)
    for name in ("cls", "kd", "pca", "gl", "adv", "disc", "total") if use_logits else ("cls", "pca", "gl", "adv", "disc", "total"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert ("kd" in ours) == use_logits

    (ours_d,) = torch.autograd.grad(ours["disc"], [layers[0].weight], retain_graph=True)
    (ref_d,) = torch.autograd.grad(ref["disc"], [d_weights[0][0]])
    torch.testing.assert_close(ours_d, ref_d, rtol=1e-4, atol=1e-6)
    ours["total"].backward()
    ref["total"].backward()
    for a, b in [(t.pca_proj.to_qkv.weight.grad, conv_w.grad), (t.gl_proj.weight.grad, torch.stack([w.grad for w in gl_w])),
                 (student.conv1.weight.grad, reference_student.conv1.weight.grad)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_gl_dropout_lambda_and_choices(small_pair, batch):
    student, teacher = small_pair
    distiller = paper_distiller(student, teacher)
    proj = distiller.trainable.gl_proj
    assert proj.dropout.p == 0.1 and distiller.trainable.cls_proj is None
    tokens = torch.randn(2, 16, proj.weight.shape[2])
    assert not torch.equal(proj.train()(tokens), proj(tokens))  # dropped, freshly each call
    assert torch.equal(proj.eval()(tokens), proj(tokens))
    assert distiller.distill_weight(0) == distiller.distill_weight(100) == 0.1
    losses = distiller(*batch, epoch=0)
    assert set(losses) == {"cls", "kd", "pca", "gl", "adv", "disc", "total"}
    gl_only = cakd.build_distiller("cakd", student, teacher, use_pca=False, use_adv=False, use_token=False)
    assert gl_only.discriminator is None and gl_only.trainable.pca_proj is None
    assert set(gl_only(*batch, epoch=0)) == {"cls", "gl", "total"}
    with pytest.raises(ValueError, match="pca_form='Paper' is not one of released, paper"):
        make_config("cakd", pca_form="Paper")
    with pytest.raises(ValueError, match="use_pca on or use disc_form=mlp"):
        make_config("cakd", use_pca=False)
    assert parse_args(["--pca-form", "paper", "--disc-every", "5"]).pca_form == "paper"


# ---- YAMLs -----------------------------------------------------------------------------------
ABLATIONS = ["ablation_logits", "ablation_gl", "ablation_pca", "ablation_robust"]


@pytest.mark.parametrize("name", ["cakd_paper", "kd"] + ABLATIONS)
def test_paper_yamls_parse_and_share_the_training_set_up(name):
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    args = parse_args(["--config", path])
    config = make_config(args.recipe, **distiller_overrides(args))
    distiller_keys = {f.name for f in dataclasses.fields(CAKDConfig)} - {"label_smoothing"}
    set_up = vars(parse_args(["--config", os.path.join(ROOT, "configs", "paper_setup.yaml")]))
    mine = vars(args)
    same = lambda d: {k: v for k, v in d.items() if k not in distiller_keys | {"recipe", "config"}}  # noqa: E731
    assert same(mine) == same(set_up)  # one training set-up, written once (configs/paper_setup.yaml)
    assert args.weight_decay == 1e-4 and args.norm_weight_decay is None and args.mixup_alpha == 0.0
    assert args.clip_grad_norm is None  # the paper's plain SGD in every column, C1 and C2 included
    assert config.logits_form == "kd" or not getattr(config, "use_logits", True)  # the paper's "Logits" is Hinton KD
    if getattr(config, "use_pca", False):  # FIDELITY.md, "A paper recipe that learns"
        assert (config.pca_loss_norm, config.pca_lr_factor) == ("relative", 0.01)
    if name == "cakd_paper":
        assert {k: getattr(config, k) for k in PAPER} == PAPER
    if name in ("kd", "ablation_logits"):  # Figure 3's C1 is the paper's "Logits" column: Hinton KD
        assert args.recipe == "kd" and (config.kd_temperature, config.kd_alpha) == (1.0, 0.5)
    if name in ("ablation_gl", "ablation_pca", "ablation_robust"):
        assert config.use_logits and not config.use_token and config.gl_dropout == 0.1
        assert config.use_pca == (name != "ablation_gl") and config.use_adv == (name == "ablation_robust")
    if name == "ablation_robust":  # Figure 3's C5 and C6: the full method, the very run of cakd_paper.yaml
        full = vars(parse_args(["--config", os.path.join(ROOT, "configs", "cakd_paper.yaml")]))
        assert {k: v for k, v in mine.items() if k != "config"} == {k: v for k, v in full.items() if k != "config"}
    # the run script's --config comes first, so a later one (an ablation) wins
    assert parse_args(["--config", os.path.join(ROOT, "configs", "cakd_paper.yaml"), "--config", path]).recipe == args.recipe


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from make_image_folder import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=8, val_per_class=3, size=72)


def test_paper_recipe_trains_with_torchrun(data_dir, tmp_path):
    out = str(tmp_path / "out")
    result = torchrun(small_flags("cakd_paper", data_dir, out, epochs=1) + ["--iters-per-epoch", "3", "--disc-every", "2"])
    assert "Epoch: [0]" in result.stdout and "Acc@1" in result.stdout and "2 process(es)" in result.stdout
    assert "loss_adv" in result.stdout and "loss_disc" in result.stdout
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert set(checkpoint["discriminator"]) == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert "pca_proj.to_qkv.weight" in checkpoint["projectors"] and "cls_proj.weight" not in checkpoint["projectors"]
    assert checkpoint["args"]["pca_form"] == "paper" and checkpoint["args"]["disc_every"] == 2


# ---- noisy evaluation: a corruption protocol unlike training (Figure 3, C4 and C5) -----------------
def test_corruptions_are_not_training_transforms_and_are_seeded_per_image():
    from cakd.corruptions import CORRUPTIONS, VIEW_PROTOCOLS, Corruptions

    assert not set(CORRUPTIONS) & set(TRANSFORMS)  # none of them a multi-view generator transform
    assert VIEW_PROTOCOLS["corruptions"].names == CORRUPTIONS and VIEW_PROTOCOLS["train_views"].names == TRANSFORMS
    protocol = Corruptions()
    images, _ = assert_views_seeded_per_image(protocol, CORRUPTIONS, 32)
    images = images[:5]
    mean, std = MEAN_STD
    elastic = protocol.view(images, "elastic", range(5))
    assert not torch.equal(elastic, protocol.view(images, "elastic", range(5), seed=1))  # the one random corruption
    assert not torch.equal(elastic[:1], protocol.view(images[:1], "elastic", [7]))  # drawn per image index
    # what each one is, written with plain torchvision calls
    pixels = (images * std + mean).clamp(0, 1)
    as_uint8 = (pixels * 255).round().to(torch.uint8)
    from torchvision.transforms.v2 import functional as TF
    expected = {
        "posterize": TF.posterize(as_uint8, 3).float() / 255,
        "jpeg": TF.jpeg(as_uint8, 15).float() / 255,
        "pixelate": TF.resize(TF.resize(pixels, [8, 8], antialias=True), [32, 32], TF.InterpolationMode.NEAREST),
    }
    for name, value in expected.items():
        torch.testing.assert_close(protocol.view(images, name, range(5)) * std + mean, value, atol=1e-5, rtol=0, msg=name)
