"""The teacher-family registry: a family registered from a module outside the package works
wherever a built-in teacher does, and an unknown teacher is one error listing the known ones."""
import importlib
import sys
import textwrap

import pytest
import torch

import cakd
import cakd.students
import cakd.teachers.registry
import cakd.zoo
from cakd.teachers.registry import TEACHERS, check_teacher_input, family_of, teacher_taps, token_grid
from cakd.zoo import build_teacher, check_pair

# the names the issue gives the built-in families, in the order --teacher lists them
BUILT_IN = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "deit_b",
            "swin_t", "swin_s", "swin_b", "swin_l", "swin_v2_t", "swin_v2_s", "swin_v2_b", "resnet152x2")

# a user's plug-in: a module of its own that imports cakd.teachers and registers a family
PLUGIN = '''
from torchvision.models import VisionTransformer

from cakd.teachers.registry import register_teacher_family
from cakd.teachers.base import TeacherFamily
from cakd.teachers.vit import ViTTaps, vit_grid


class TinyViT(VisionTransformer):
    """A ViT class of its own, so that its family is told from a built model too."""


def tiny_vit_s16(num_classes=1000, image_size=64):
    return TinyViT(image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                   num_classes=num_classes)


@register_teacher_family
class TinyViTFamily(TeacherFamily):
    model_class = TinyViT
    names = ("tiny_vit_s16",)
    builders = {"tiny_vit_s16": tiny_vit_s16}

    def build(self, name, num_classes=1000, image_size=224):
        return self.builders[name](num_classes=num_classes, image_size=image_size)

    def token_grid(self, model, image_size, name=None):
        return vit_grid(model, image_size, name)

    def taps(self, teacher, image_size, attention=True, tokens=True, qkv=False, fold="auto"):
        return ViTTaps(teacher, attention, tokens, qkv, fold)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module imported from a folder outside the package; the registry (and so
    TEACHERS) is as before once the test ends."""
    monkeypatch.setattr(cakd.teachers.registry, "REGISTRY", dict(cakd.teachers.registry.REGISTRY))
    (tmp_path / "my_teachers.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("my_teachers")
    sys.modules.pop("my_teachers", None)


def test_built_in_names_and_families():
    assert tuple(TEACHERS) == BUILT_IN
    assert cakd.zoo.student_names() == cakd.students.CNN_STUDENTS + BUILT_IN
    for name in BUILT_IN:
        with torch.device("meta"):
            model = cakd.zoo.architecture(name)
        assert family_of(model) is family_of(name) and name in family_of(name).names, name
    assert family_of("vit_b_16") is family_of("deit_b") is not family_of("swin_l") is family_of("swin_v2_b")
    assert family_of("resnet50") is None and family_of(cakd.build_student("resnet18")) is None


def test_a_plugin_family_builds_teachers_and_taps(plugin, tmp_path):
    assert TEACHERS[-1] == "tiny_vit_s16" and "tiny_vit_s16" in cakd.zoo.student_names()
    torch.manual_seed(0)
    teacher = build_teacher("tiny_vit_s16", weights="none", image_size=64, num_classes=10)
    assert isinstance(teacher, plugin.TinyViT) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert isinstance(family_of(teacher), plugin.TinyViTFamily)
    assert not isinstance(family_of(cakd.zoo.architecture("vit_b_32", image_size=64)), plugin.TinyViTFamily)
    assert token_grid(teacher, 64) == 4
    check_pair("resnet18", "tiny_vit_s16", 64)  # 4x4 tokens: resnet18's layer3 at 64
    with pytest.raises(ValueError, match="image size 72 is not a multiple of tiny_vit_s16's patch size 16"):
        check_teacher_input("tiny_vit_s16", 72)

    taps = teacher_taps(teacher, 64)
    assert (taps.grid, taps.width, taps.num_heads, taps.image_size) == (4, 32, 2, 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = taps(images)
        expected_logits = teacher(images)
    assert out["logits"].shape == (2, 10) and out["cls_token"].shape == (2, 32) and out["patch_tokens"].shape == (2, 16, 32)
    torch.testing.assert_close(out["logits"], expected_logits)
    # the map from its definition: the last block's q k^T / sqrt(d), head mean, class token dropped
    block = teacher.encoder.layers[-1]
    seen = {}
    block.ln_1.register_forward_hook(lambda module, args, output: seen.__setitem__("x", output))
    with torch.no_grad():
        teacher(images)
        q, k, _ = torch.nn.functional.linear(seen["x"][:, 1:], block.self_attention.in_proj_weight,
                                             block.self_attention.in_proj_bias).chunk(3, -1)
    q, k = q.view(2, 16, 2, 16).transpose(1, 2), k.view(2, 16, 2, 16).transpose(1, 2)
    torch.testing.assert_close(out["attn_qk"], (q @ k.transpose(-1, -2) / 4.0).mean(1), rtol=1e-5, atol=1e-5)
    taps.remove()

    # weights by file, as for deit_b; torchvision has none for it
    path = tmp_path / "tiny.pth"
    torch.save(teacher.state_dict(), path)
    loaded = build_teacher("tiny_vit_s16", weights=str(path), image_size=64)
    assert torch.equal(loaded.heads.head.weight, teacher.heads.head.weight)
    with pytest.raises(ValueError, match="torchvision has no tiny_vit_s16 weights: pass the .pth file"):
        build_teacher("tiny_vit_s16", weights="IMAGENET1K_V1")

    # and a CAKD step with it as the teacher
    torch.manual_seed(0)
    distiller = cakd.build_distiller("cakd", cakd.build_student("resnet18", num_classes=10), teacher, image_size=64).train()
    losses = distiller(images, torch.tensor([3, 7]), epoch=40)
    assert torch.isfinite(losses["total"]) and losses["pca"] > 0
    distiller.close()


def test_a_name_is_registered_once(plugin):
    with pytest.raises(ValueError, match="teacher tiny_vit_s16 is already registered: give TinyViTFamily other names"):
        cakd.teachers.registry.register_teacher_family(plugin.TinyViTFamily)


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_teacher("vit_x_16"),
        lambda: check_teacher_input("vit_x_16", 224),
        lambda: check_pair("resnet50", "vit_x_16", 224),
    ],
)
def test_an_unknown_teacher_is_one_error_listing_the_known_ones(call):
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value) == f"unknown teacher 'vit_x_16': choose one of {', '.join(BUILT_IN)}"


def test_a_model_of_no_family_has_no_taps():
    with pytest.raises(TypeError, match="the teacher must be a torchvision VisionTransformer or SwinTransformer or cakd "
                                        "WideResNetTeacher, got ResNet"):
        teacher_taps(cakd.build_student("resnet18"), 224)
