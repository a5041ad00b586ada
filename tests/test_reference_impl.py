"""Self-checks of the yardstick, ``reference_impl.py``: against torchvision and against the
spec's own numbers (``docs/reference.md``). Nothing here uses ``cakd``."""
import copy

import pytest
import torch
import torchvision

import reference_impl as R

SPEC_PATCHGAN = {  # "Discriminator": 1->8 (bias), 8->16, 16->32, 32->64 (no bias, BN), 64->1 (bias), k4
    "model.0.weight": (8, 1, 4, 4), "model.0.bias": (8,),
    "model.2.weight": (16, 8, 4, 4),
    **{f"model.3.{k}": (16,) for k in ("weight", "bias", "running_mean", "running_var")}, "model.3.num_batches_tracked": (),
    "model.5.weight": (32, 16, 4, 4),
    **{f"model.6.{k}": (32,) for k in ("weight", "bias", "running_mean", "running_var")}, "model.6.num_batches_tracked": (),
    "model.8.weight": (64, 32, 4, 4),
    **{f"model.9.{k}": (64,) for k in ("weight", "bias", "running_mean", "running_var")}, "model.9.num_batches_tracked": (),
    "model.11.weight": (1, 64, 4, 4), "model.11.bias": (1,),
}


# ---- the spec's numbers -----------------------------------------------------------------------
def test_spec_numbers():
    assert (R.PCA_HEADS, R.PCA_HEAD_DIM, R.GL_WINDOW) == (16, 64, 4)
    assert R.PATCHGAN_WIDTHS == (1, 8, 16, 32, 64, 1)
    assert (R.PCA_QK_WEIGHT, R.PCA_VV_WEIGHT, R.FEATURE_WEIGHT, R.ADV_REAL_WEIGHT, R.DISC_WEIGHT) == (0.2, 0.05, 0.05, 0.05, 0.5)
    assert [R.lam(e) for e in (0, 25, 26, 30, 35, 100)] == [0, 0, 0.02, 0.1, 0.2, 0.2]


@pytest.mark.parametrize("grid, sizes", [
    (14, [16, 16, 16, 8] * 3 + [8, 8, 8, 4]),  # ViT-B/16 at 224: 16 groups, edge windows 4x2, 2x4, 2x2
    (7, [16, 12, 12, 9]),                       # ViT-B/32 at 224: 4 groups
    (6, [16, 8, 8, 4]),                         # the 96x96 small pair: 4 groups
])
def test_group_sizes(grid, sizes):
    groups = R.group_token_indices(grid, R.GL_WINDOW)
    assert [len(g) for g in groups] == sizes
    assert sorted(i for g in groups for i in g) == list(range(grid * grid))
    if grid == 14:  # group 3 is the top-right window (row-major windows, row-major tokens)
        assert groups[3] == [r * 14 + c for r in range(4) for c in (12, 13)]


def test_patchgan_keys_shapes_and_map_size():
    disc = R.make_patchgan().train()
    assert {k: tuple(v.shape) for k, v in disc.state_dict().items()} == SPEC_PATCHGAN
    assert list(disc.state_dict()) == list(SPEC_PATCHGAN)  # pix2pix order
    assert disc(torch.randn(2, 1, 196, 196)).shape == (2, 1, 1, 1)
    with pytest.raises(RuntimeError):  # a 4x4 token grid's 16x16 maps are too small for it
        disc(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("teacher_name, stage, C, grid, groups", [("vit_b_16", "layer3", 1024, 14, 16),
                                                                  ("vit_b_32", "layer4", 2048, 7, 4)])
def test_full_size_shapes_are_the_specs(teacher_name, stage, C, grid, groups):
    """ResNet-50 + ViT-B on the meta device: the widths the reference reads and its own projectors."""
    with torch.device("meta"):
        student = torchvision.models.resnet50(num_classes=1000)
        teacher = torchvision.models.get_model(teacher_name)
        dims = R.spec_dims(student, teacher)
        projectors = R.ReferenceProjectors(dims["C"], dims["P"], dims["D_T"], dims["num_groups"])
    assert {k: dims[k] for k in ("stage", "C", "P", "D_T", "grid", "num_groups")} == dict(
        stage=stage, C=C, P=2048, D_T=768, grid=grid, num_groups=groups)
    # the released checkpoint's projector keys ("Checkpoint layout"), less the unused to_out
    expected = {"pca_proj.to_qkv.weight": (3 * 16 * 64, C), "cls_proj.weight": (768, 2048), "cls_proj.bias": (768,)}
    for g in range(groups):
        expected[f"gl_proj.layers.fc_layer_{g}.weight"] = (768, C)
        expected[f"gl_proj.layers.fc_layer_{g}.bias"] = (768,)
    assert {k: tuple(v.shape) for k, v in projectors.state_dict().items()} == expected


def test_attention_maps_use_sixteen_heads_of_sixty_four():
    """The head count is invisible in the (3072, C) weight; the maps are not: a 32x32 split of
    the same weight gives maps sqrt(2) smaller (mean over 2x the heads, scale 1/sqrt(32)).
    In float64: the two sides sum the 1024 products of each entry in different orders (one element came
    out 1.2e-5 apart on a 2-core CPU), an order effect, not the head split this test is about."""
    torch.manual_seed(0)
    S, W = torch.randn(2, 36, 24, dtype=torch.float64), torch.randn(3072, 24, dtype=torch.float64)
    qk, vv = R.attention_projector(S, W)
    q, k, v = (S @ W.T).chunk(3, -1)
    torch.testing.assert_close(qk, q @ k.transpose(1, 2) / 16 / 8)  # sum over heads == full dot
    torch.testing.assert_close(vv, v @ v.transpose(1, 2) / 16 / 8)
    q32, k32 = R.split_heads_loop(q, 32), R.split_heads_loop(k, 32)
    qk32 = torch.stack([a @ b.transpose(1, 2) for a, b in zip(q32, k32)]).mean(0) * 32**-0.5
    torch.testing.assert_close(qk, qk32 * 2**0.5)
    assert (qk - qk32).abs().max() > 0.1 * qk.abs().max()
    with pytest.raises(AssertionError):  # 16 heads of 32
        R.attention_projector(S, torch.randn(1536, 24, dtype=torch.float64))


# ---- the strict loader ---------------------------------------------------------------------------
def project_layout(ref):
    """A state in the project's layout (group Linears stacked), made from the reference's own."""
    p = ref.projectors
    state = {f"student.{k}": v for k, v in ref.student.state_dict().items()}
    state["pca_proj.to_qkv.weight"] = p.pca_proj.to_qkv.weight.detach() + 1
    state["gl_proj.weight"] = torch.stack([fc.weight.detach() for fc in p.group_layers()]) + 1
    state["gl_proj.bias"] = torch.stack([fc.bias.detach() for fc in p.group_layers()]) + 1
    state["cls_proj.weight"], state["cls_proj.bias"] = p.cls_proj.weight.detach() + 1, p.cls_proj.bias.detach() + 1
    return state


def test_strict_loader_copies_and_refuses_other_shapes():
    student, teacher = R.make_small_pair(image_size=96)
    ref = R.ReferenceCAKD(student, teacher)
    trainable, disc = project_layout(ref), {k: v + 1 for k, v in R.make_patchgan().state_dict().items()}
    ref.load_project_state(trainable, disc)
    layers = ref.projectors.group_layers()
    assert torch.equal(layers[2].weight, trainable["gl_proj.weight"][2]) and torch.equal(layers[3].bias, trainable["gl_proj.bias"][3])
    assert torch.equal(ref.projectors.pca_proj.to_qkv.weight, trainable["pca_proj.to_qkv.weight"])
    assert all(torch.equal(ref.discriminator.state_dict()[k], v) for k, v in disc.items())
    assert ref.projectors.pca_proj.to_qkv.weight.data_ptr() != trainable["pca_proj.to_qkv.weight"].data_ptr()

    def refused(match, trainable=trainable, disc=disc):
        with pytest.raises(R.SpecMismatch, match=match):
            ref.load_project_state(trainable, disc)

    refused(r"model.0.weight has shape \(16, 1, 4, 4\), the spec's is \(8, 1, 4, 4\)",
            disc={**disc, "model.0.weight": torch.zeros(16, 1, 4, 4)})
    refused(r"missing \['model.11.bias'\]", disc={k: v for k, v in disc.items() if k != "model.11.bias"})
    refused(r"unexpected \['model.12.weight'\]", disc={**disc, "model.12.weight": torch.zeros(1)})
    refused(r"pca_proj.to_qkv.weight has shape \(1536, 256\)", trainable={**trainable, "pca_proj.to_qkv.weight": torch.zeros(1536, 256)})
    refused("window rule gives 4 groups", trainable={**trainable, "gl_proj.weight": torch.zeros(9, 32, 256), "gl_proj.bias": torch.zeros(9, 32)})
    refused(r"gl_proj.layers.fc_layer_0.weight has shape \(64, 256\)",
            trainable={**trainable, "gl_proj.weight": torch.zeros(4, 64, 256), "gl_proj.bias": torch.zeros(4, 64)})
    refused("are not the released projectors'", trainable={k: v for k, v in trainable.items() if not k.startswith("cls_proj")})
    refused("neither the student's nor a projector's", trainable={**trainable, "extra.weight": torch.zeros(1)})
    refused(r"student: keys differ", trainable={k: v for k, v in trainable.items() if k != "student.fc.bias"})
    refused("is torch.float64", disc={**disc, "model.0.bias": disc["model.0.bias"].double()})


def test_hooked_models_are_refused():
    student, teacher = R.make_small_pair(image_size=96)
    handle = teacher.encoder.layers[-1].ln_1.register_forward_hook(lambda *args: None)
    with pytest.raises(AssertionError, match="carries hooks"):
        R.ReferenceCAKD(student, teacher)
    handle.remove()
    R.ReferenceCAKD(student, teacher)


# ---- one step, checked piece by piece --------------------------------------------------------------
def check_teacher_forward(teacher, images, atol=1e-5):
    """The hand-written last block matches torchvision: z_T == teacher(images) and the per-head
    softmax(scores) averaged over heads == nn.MultiheadAttention's averaged weights."""
    T = R.teacher_forward(teacher, images)
    with torch.no_grad():
        z_ref = teacher(images)
        attn = teacher.encoder.layers[-1].self_attention
        _, w_ref = attn(T["X"], T["X"], T["X"], need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(T["z_T"], z_ref, rtol=0, atol=atol)
    w_mine = torch.stack([torch.softmax(s, -1) for s in T["scores"]], 0).mean(0)
    torch.testing.assert_close(w_mine, w_ref, rtol=0, atol=atol)
    return T


def test_small_pair_at_64_teacher_and_student_taps():
    """The 64x64 pair (4x4 grid): the taps work, only the spec's PatchGAN cannot take its maps."""
    student, teacher = R.make_small_pair(num_classes=10, seed=0)
    images = torch.randn(2, 3, 64, 64)
    T = check_teacher_forward(teacher, images)
    assert T["A_T_qk"].shape == (2, 16, 16)
    Fmap, P, z_S = R.student_forward(student, images, 4, stage="layer3")
    assert Fmap.shape == (2, 256, 4, 4) and P.shape == (2, 512) and z_S.shape == (2, 10)
    assert [len(g) for g in R.group_token_indices(4, 4)] == [16]


CASES = {  # name: (image size, patch, seed, C, grid, F stage, soft targets)
    "96_layer3": (96, 16, 0, 256, 6, "layer3", False),
    "224_32_layer4": (224, 32, 1, 512, 7, "layer4", True),
}


@pytest.fixture(scope="module", params=list(CASES))
def step(request):
    size, patch, seed, C, grid, stage, soft = CASES[request.param]
    student, teacher = R.make_small_pair(num_classes=10, seed=seed, image_size=size, patch_size=patch)
    ref = R.ReferenceCAKD(student, teacher)
    assert {k: ref.dims[k] for k in ("C", "grid", "stage", "P", "D_T")} == dict(C=C, grid=grid, stage=stage, P=512, D_T=32)
    torch.manual_seed(123)
    images = torch.randn(2, 3, size, size)
    targets = torch.softmax(torch.randn(2, 10), -1) if soft else torch.randint(0, 10, (2,))
    before = dict(student=copy.deepcopy(student), disc=copy.deepcopy(ref.discriminator))
    out = ref(images, targets, epoch=40, label_smoothing=0.1)
    return dict(ref=ref, images=images, targets=targets, out=out, before=before, C=C, grid=grid)


def test_teacher_forward_matches_torchvision(step):
    check_teacher_forward(step["ref"].teacher, step["images"])


def test_shapes_and_total(step):
    out, N, D_T, B, K = step["out"], step["grid"] ** 2, 32, 2, 10
    expect = dict(A_T_qk=(B, N, N), A_T_vv=(B, N, N), A_S_qk=(B, N, N), A_S_vv=(B, N, N),
                  f_S=(B, N, D_T), f_T=(B, N, D_T), t_S=(B, D_T), t_T=(B, D_T), z_S=(B, K),
                  z_T=(B, K), p_real=(B, 1, 1, 1), p_fake=(B, 1, 1, 1))
    assert {k: tuple(out[k].shape) for k in expect} == expect
    for k in ("cls", "pca", "gl", "adv", "disc", "total"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    torch.testing.assert_close(out["total"], out["cls"] + 0.2 * (out["pca"] + out["gl"] + out["adv"]))


def test_functional_patchgan_equals_its_module(step):
    """Logits, and BatchNorm running stats after the two train-mode calls."""
    out, disc, module = step["out"], step["ref"].discriminator, step["before"]["disc"]
    with torch.no_grad():
        torch.testing.assert_close(module(out["A_T_qk"][:, None]), out["p_real"], rtol=0, atol=1e-5)
        torch.testing.assert_close(module(out["A_S_qk"][:, None]), out["p_fake"], rtol=0, atol=1e-5)
    functional, by_module = disc.state_dict(), module.state_dict()
    assert list(functional) == list(SPEC_PATCHGAN)
    for k in functional:
        torch.testing.assert_close(functional[k].float(), by_module[k].float(), rtol=0, atol=1e-6, msg=k)
    assert int(functional["model.3.num_batches_tracked"]) == 2


def test_student_forward_equals_the_module(step):
    with torch.no_grad():
        z = step["before"]["student"](step["images"])  # same BatchNorm state before the call
    torch.testing.assert_close(z, step["out"]["z_S"], rtol=0, atol=1e-5)


def test_gradient_routes(step):
    """adv and L_D reach only D (quirk 2: the fake map is detached); pca and gl reach the
    student's F stage; the total reaches the student and every projector tensor."""
    ref, out = step["ref"], step["out"]
    student, projectors = list(ref.student.parameters()), list(ref.projectors.parameters())
    disc = list(ref.discriminator.parameters())
    ns = len(student) + len(projectors)
    for term in ("adv", "disc"):
        grads = torch.autograd.grad(out[term], student + projectors + disc, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads[:ns]), f"{term} must not reach the student or projectors"
        assert any(g is not None and g.abs().sum() > 0 for g in grads[ns:]), term
    F_stage = getattr(ref.student, ref.dims["stage"])
    for term in ("pca", "gl"):
        (g,) = torch.autograd.grad(out[term], [F_stage[0].conv1.weight], retain_graph=True)
        assert g.abs().sum() > 0, term
    s = ref.student
    named = [s.conv1.weight, s.layer3[0].conv1.weight, s.layer4[0].conv1.weight, s.fc.weight] + projectors
    grads = torch.autograd.grad(out["total"], named, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)


def test_lambda_zero_before_epoch_26():
    student, teacher = R.make_small_pair(image_size=96)
    ref = R.ReferenceCAKD(student, teacher)
    torch.manual_seed(1)
    out = ref(torch.randn(2, 3, 96, 96), torch.tensor([1, 2]), epoch=10, label_smoothing=0.1)
    assert out["pca"] > 0 and out["gl"] > 0 and out["adv"] > 0
    assert torch.equal(out["total"], out["cls"])
