"""The paper's other pairs (Tables 2-3): every Table 3 student with a ViT and a Swin teacher,
the rule that picks the student's stage, and the Swin teacher's score maps."""
import math

import pytest
import torch
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

import cakd
from cakd.students import student_layout
from cakd.zoo import architecture
from cakd.taps import split_heads
from cakd.teachers.registry import teacher_taps
from cakd.teachers.swin import SwinTaps, swin_qkv, swin_scores
from cakd.train.trainer import main
from conftest import tiny_vit

TABLE3_STUDENTS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
TABLE3_TEACHERS = ("vit_b_16", "vit_l_16", "deit_b", "swin_b", "swin_l")


def tiny_swin(v2=False, num_classes=10, seed=1):
    """A Swin of four one- or two-block stages and narrow widths; its parameters are perturbed,
    since torchvision zero-initialises biases and the position-bias table is near zero."""
    torch.manual_seed(seed)
    kwargs = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1, 1, 2],
        num_heads=[1, 1, 2, 4],
        window_size=[8, 8] if v2 else [7, 7],
        num_classes=num_classes,
        **kwargs,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.requires_grad_(False)


@pytest.mark.parametrize("teacher_kind", ["vit", "swin"])
@pytest.mark.parametrize("student_name", TABLE3_STUDENTS)
def test_every_table3_student_takes_a_cakd_step(student_name, teacher_kind):
    """At 64x64: a ViT/16 gives a 4x4 grid, a Swin a 2x2 one; the attention and group-wise
    terms both send a gradient into the student."""
    teacher = tiny_vit(num_layers=2) if teacher_kind == "vit" else tiny_swin()
    torch.manual_seed(0)
    student = cakd.build_student(student_name, num_classes=10)
    distiller = cakd.build_distiller("cakd", student, teacher, image_size=64).train()
    torch.manual_seed(2)
    losses = distiller(torch.randn(2, 3, 64, 64), torch.tensor([3, 7]), epoch=40)
    assert set(losses) == {"cls", "pca", "gl", "adv", "disc", "total"}
    assert all(torch.isfinite(value) for value in losses.values()), losses
    params = [p for p in student.parameters()]
    for term in ("pca", "gl"):
        grads = torch.autograd.grad(losses[term], params, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, term
    distiller.close()


# the stage of each Table 3 student for a 14x14 (ViT/16) and a 7x7 (Swin) grid at 224, with its width
EXPECTED_STAGES = {
    ("resnet18", 14): ("layer3", 256),
    ("resnet18", 7): ("layer4", 512),
    ("resnet50", 14): ("layer3", 1024),
    ("resnet50", 7): ("layer4", 2048),
    ("mobilenet_v2", 14): ("features.13", 96),
    ("mobilenet_v2", 7): ("features.18", 1280),
    ("efficientnet_b0", 14): ("features.5", 112),
    ("efficientnet_b0", 7): ("features.8", 1280),
}
POOLED = {"resnet18": 512, "resnet50": 2048, "mobilenet_v2": 1280, "efficientnet_b0": 1280}


@pytest.mark.parametrize("teacher_name", TABLE3_TEACHERS)
@pytest.mark.parametrize("student_name", TABLE3_STUDENTS)
def test_tap_rule_picks_the_named_stage_at_full_size(student_name, teacher_name):
    """Full-size models on the meta device (no memory, no init): the distiller taps the stage
    the issue names, sized from the model, and the classifier's input."""
    with torch.device("meta"):
        student, teacher = architecture(student_name), architecture(teacher_name)
        distiller = cakd.build_distiller("cakd", student, teacher, image_size=224)
    grid = 7 if teacher_name.startswith("swin") else 14
    stage, channels = EXPECTED_STAGES[(student_name, grid)]
    taps = distiller.trainable.taps
    assert (taps.stage, taps.head) == (stage, "fc" if student_name.startswith("resnet") else "classifier")
    width = teacher.head.in_features if teacher_name.startswith("swin") else teacher.hidden_dim
    assert distiller.trainable.gl_proj.weight.shape == (math.ceil(grid / 4) ** 2, width, channels)
    assert distiller.trainable.cls_proj.weight.shape == (width, POOLED[student_name])
    assert distiller.trainable.pca_proj.to_qkv.in_features == channels


def test_every_cnn_student_finds_a_stage_for_vit16_and_swin():
    for name in cakd.students.CNN_STUDENTS:
        with torch.device("meta"):
            layout = student_layout(architecture(name), 224, name)
        for grid in (14, 7):
            stage, channels = layout.stage_for(grid)
            assert channels > 0 and stage.startswith(("layer", "features.", "Mixed_")), (name, stage)


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("v2", [False, True])
def test_swin_maps_are_the_blocks_own(v2, size):
    """Per head, softmax of the recomputed scores times v, through the block's projection,
    is the block's attention output; the map the distiller uses is the scores' head mean over
    the grid's tokens. At 64 the 2x2 last stage sits padded in one window, at 224 it fills it."""
    teacher = tiny_swin(v2=v2)
    attn = teacher.features[-1][-1].attn
    seen = {}
    attn.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    taps = SwinTaps(teacher, size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = taps(images)
        x = seen["x"]
        q, k, v, real = swin_qkv(x, attn)
        scores = swin_scores(q, k, attn)
        heads = attn.num_heads
        per_head = scores.softmax(dim=-1) @ split_heads(v, heads)
        merged = per_head.transpose(1, 2).flatten(2)[:, real]
        block_output = attn(x).flatten(1, 2)
    grid = size // 32
    assert taps.grid == grid and out["attn_qk"].shape == (2, grid * grid, grid * grid) and scores.shape[1] == heads > 1
    torch.testing.assert_close(torch.nn.functional.linear(merged, attn.proj.weight, attn.proj.bias), block_output)
    torch.testing.assert_close(out["attn_qk"], scores[:, :, real][:, :, :, real].mean(dim=1))
    assert out["patch_tokens"].shape == (2, grid * grid, 128) and out["cls_token"].shape == (2, 128)
    torch.testing.assert_close(out["cls_token"], out["patch_tokens"].mean(dim=1), rtol=1e-5, atol=1e-6)
    taps.remove()


def test_swin_paper_form_reads_the_blocks_attention_output():
    """The paper's projector swaps q, k, v with the Swin teacher's and matches its attention output."""
    teacher = tiny_swin()
    student = cakd.build_student("resnet18", num_classes=10)
    distiller = cakd.build_distiller("cakd", student, teacher, image_size=64, pca_form="paper", pca_qk_weight=1.0)
    t = distiller.run_teacher(torch.randn(2, 3, 64, 64))
    assert t["q"].shape == (2, 4, 128) and t["attn_out"].shape == (2, 4, 4, 32)
    assert distiller.trainable.pca_proj.num_heads == 4 and distiller.trainable.pca_proj.head_dim == 32


def test_a_window_that_does_not_cover_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"swin_b's last stage is 14x14 at 448x448 input, larger than its 7x7 attention window"):
        cakd.build_teacher("swin_b", image_size=448)
    with pytest.raises(ValueError, match="larger than its 7x7 attention window"):
        teacher_taps(tiny_swin(), 448)


def test_swin_l_and_deit_b_have_no_torchvision_weights():
    with pytest.raises(ValueError, match="torchvision has no swin_l weights: convert the official release with scripts/convert_weights.py"):
        cakd.build_teacher("swin_l", weights="IMAGENET1K_V1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "resnet18", "--teacher", "vit_h_14"], "no stage of the resnet18 student gives the teacher's 16x16 token grid"),
        (["--teacher", "swin_b", "--train-crop-size", "448"], "swin_b's last stage is 14x14 at 448x448 input"),
        (["--dataset", "cifar100"], "no CIFAR-100 in {tmp}: expected {tmp}/cifar-100-python/ (train, test, meta); pass --download"),
        (["--train-crop-size", "72"], "--train-crop-size 72: image size 72 is not a multiple of vit_b_16's patch size 16: use a crop size such as 64 or 80"),
        (["--recipe", "logits", "--train-crop-size", "72"], "--train-crop-size 72: image size 72 is not a multiple"),
        (["--teacher", "deit_b", "--teacher-weights", "deit_b.pth"],
         "teacher weights file deit_b.pth does not exist: make it with python scripts/convert_weights.py --arch deit_b"),
        (["--dataset", "cifar100", "GENERATED"], "{tmp}/cifar-100-python/ holds train, test, meta but they are not the CIFAR-100 release"),
    ],
)
def test_bad_pairs_and_data_are_one_line(flags, message, tmp_path, capsys):
    """Found before a teacher is built or fetched: one line, status 1."""
    if "GENERATED" in flags:  # torchvision's own file names and format, not its md5 sums
        from cifar100_files import make_cifar100

        make_cifar100(str(tmp_path), train_per_class=1, test_per_class=1)
        flags = [flag for flag in flags if flag != "GENERATED"]
    argv = ["--recipe", "cakd", "--device", "cpu", "--data-path", str(tmp_path), "--output-dir", str(tmp_path / "out"),
            "--teacher-weights", "none", "--workers", "0", "--dataset", "synthetic", "--synthetic-size", "4", *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(tmp=tmp_path) in err[0], err
