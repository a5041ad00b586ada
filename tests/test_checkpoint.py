"""Import of the released checkpoint layout; export of a plain torchvision student."""
import os
import stat

import pytest
import torch
import torchvision

import cakd
from cakd.weights import save_atomic
from conftest import tiny_vit


def to_released_layout(distiller):
    """Our trainable state written back in the released ``checkpoint["model"]`` layout."""
    t = distiller.trainable
    state = dict(t.student.state_dict())
    state["pca_proj.to_qkv.weight"] = t.pca_proj.to_qkv.weight.detach().clone()
    state["pca_proj.to_out.0.weight"] = torch.randn(1024, 1024)  # released, never used
    state["pca_proj.to_out.0.bias"] = torch.randn(1024)
    for g in range(t.gl_proj.num_groups):
        state[f"gl_proj.layers.fc_layer_{g}.weight"] = t.gl_proj.weight[g].detach().clone()
        state[f"gl_proj.layers.fc_layer_{g}.bias"] = t.gl_proj.bias[g].detach().clone()
    state["cls_proj.weight"] = t.cls_proj.weight.detach().clone()
    state["cls_proj.bias"] = t.cls_proj.bias.detach().clone()
    return state


def test_released_key_layout_round_trip():
    torch.manual_seed(0)
    teacher = tiny_vit(image_size=96, num_classes=10)
    source = cakd.build_distiller("cakd", cakd.build_student("resnet50", num_classes=10), teacher)
    released = to_released_layout(source)
    assert sum(k.startswith("gl_proj.layers.fc_layer_") for k in released) == 2 * 4  # 6x6 grid: 4 groups
    target = cakd.build_distiller("cakd", cakd.build_student("resnet50", num_classes=10), teacher)
    target.load_reference_state_dict(released, discriminator_state_dict=source.discriminator.state_dict())
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    images = torch.randn(2, 3, 96, 96)
    source.eval(), target.eval()
    torch.testing.assert_close(source(images, torch.tensor([0, 1]), 40), target(images, torch.tensor([0, 1]), 40))


def test_released_discriminator_keys_match():
    disc = cakd.distillers.PatchGAN()
    keys = set(disc.state_dict())
    expected = {f"model.{i}.weight" for i in (0, 2, 5, 8, 11)} | {"model.0.bias", "model.11.bias"}
    expected |= {f"model.{i}.{k}" for i in (3, 6, 9) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == expected


def test_ddp_prefix_and_logits_recipe_import():
    teacher = tiny_vit(image_size=96)
    source = cakd.build_distiller("cakd", cakd.build_student("resnet18", num_classes=10), teacher)
    released = {"module." + k: v for k, v in to_released_layout(source).items()}
    logits = cakd.build_distiller("logits", cakd.build_student("resnet18", num_classes=10), teacher)
    with pytest.raises(ValueError, match=r"missing: none; unexpected: cls_proj.bias, cls_proj.weight, gl_proj.bias"):
        logits.load_reference_state_dict(released)  # a logits distiller has no projectors to take them
    logits.load_reference_state_dict({k: v for k, v in released.items() if not k.startswith("module.") or "_proj." not in k})
    torch.testing.assert_close(logits.student.state_dict(), source.student.state_dict())


@pytest.mark.parametrize("drop, overrides, message", [
    ("cls_proj.", {}, r"missing: cls_proj.bias, cls_proj.weight; unexpected: none"),
    ("nothing", {"use_pca": False, "disc_form": "mlp"}, r"missing: none; unexpected: pca_proj.to_qkv.weight"),
    ("gl_proj.", {"use_pca": False, "disc_form": "mlp"}, r"missing: gl_proj.bias, gl_proj.weight; unexpected: pca_proj"),
])
def test_import_fails_on_a_missing_or_unexpected_projector_key(drop, overrides, message):
    """A projector the file lacks would stay random, one it has too many would be dropped: both fail."""
    teacher = tiny_vit(image_size=96)
    source = cakd.build_distiller("cakd", cakd.build_student("resnet18", num_classes=10), teacher)
    released = {k: v for k, v in to_released_layout(source).items() if not k.startswith(drop)}
    target = cakd.build_distiller("cakd", cakd.build_student("resnet18", num_classes=10), teacher, **overrides)
    with pytest.raises(ValueError, match=message):
        target.load_reference_state_dict(released)


def test_import_that_does_not_fit_is_one_clear_error():
    teacher = tiny_vit(image_size=96)
    source = cakd.build_distiller("cakd", cakd.build_student("resnet18", num_classes=10), teacher)
    wrong = cakd.build_distiller("baseline", cakd.build_student("resnet34", num_classes=10))
    with pytest.raises(ValueError, match="checkpoint does not fit the ResNet student"):
        wrong.load_reference_state_dict(to_released_layout(source))


def test_export_loads_strictly_into_torchvision_and_gives_the_same_logits():
    torch.manual_seed(0)
    student = cakd.build_student("resnet50", num_classes=7)
    teacher = tiny_vit(image_size=64, num_classes=7)
    distiller = cakd.build_distiller("cakd", student, teacher)
    losses = distiller(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), epoch=40)
    losses["total"].backward()
    torch.optim.SGD(distiller.trainable.parameters(), lr=0.1).step()  # weights moved by a step
    state = cakd.export_student(distiller)
    plain = torchvision.models.resnet50(num_classes=7)
    plain.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    distiller.eval(), plain.eval()
    torch.testing.assert_close(plain(images), distiller.student(images))
    assert not any(k.startswith(("pca_proj", "gl_proj", "cls_proj")) for k in state)


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"a": torch.ones(2)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.load(path)["a"].sum() == 2  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_teacher_from_local_file_with_interpolated_position_embeddings(tmp_path):
    """A teacher file trained at 224 serves a 64x64 run: position embeddings are interpolated."""
    torch.manual_seed(0)
    full = torchvision.models.vit_b_32(num_classes=5)
    path = tmp_path / "teacher.pth"
    torch.save({"model": full.state_dict()}, path)
    teacher = cakd.build_teacher("vit_b_32", weights=str(path), image_size=64)
    assert teacher.encoder.pos_embedding.shape == (1, 5, 768)
    assert teacher.num_classes == 5 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.encoder.pos_embedding[:, 0], full.encoder.pos_embedding[:, 0])
    with pytest.raises(ValueError, match="predict 5 classes, not 1000"):
        cakd.build_teacher("vit_b_32", weights=str(path), image_size=64, num_classes=1000)


def test_save_atomic_gives_the_file_mode_of_a_plain_open(tmp_path):
    """Checkpoints get the user's usual mode (0666 less the umask), not mkstemp's private 0600."""
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            path = str(tmp_path / f"ckpt_{umask:o}.pth")
            save_atomic({"a": torch.ones(1)}, path)
            with open(tmp_path / f"plain_{umask:o}", "w"):
                pass
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(tmp_path / f"plain_{umask:o}").st_mode) == 0o666 & ~umask
