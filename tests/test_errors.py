"""Bad pairs and bad input give one clear error of the right type, not a traceback from torch."""
import pytest
import torch

import cakd
from conftest import tiny_vit


def test_grids_that_cannot_be_matched():
    student = cakd.build_student("resnet18", num_classes=10)
    teacher = tiny_vit(image_size=224, patch_size=14)  # 16x16 tokens; ResNet stages are 56/28/14/7
    with pytest.raises(ValueError, match=r"no stage of the ResNet student gives the teacher's 16x16 token grid at 224x224 "
                       r"input; its stages give .*14x14 \(layer3\), 7x7 \(layer4\)"):
        cakd.build_distiller("cakd", student, teacher)


def test_input_size_the_teacher_cannot_take(small_pair):
    student, teacher = small_pair
    distiller = cakd.build_distiller("cakd", student, teacher)
    with pytest.raises(ValueError, match=r"teacher was built for 64x64.*image_size=96"):
        distiller(torch.randn(1, 3, 96, 96), torch.tensor([0]))


def test_image_size_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match=r"not a multiple of vit_b_16's patch size 16"):
        cakd.build_teacher("vit_b_16", image_size=200)


@pytest.mark.parametrize("recipe", ["logits", "cakd"])
def test_class_counts_that_differ(recipe):
    student = cakd.build_student("resnet18", num_classes=10)
    teacher = tiny_vit(num_classes=1000)
    with pytest.raises(ValueError, match=r"teacher predicts 1000 classes and the student/dataset 10"):
        cakd.build_distiller(recipe, student, teacher)


def test_baseline_needs_no_teacher():
    distiller = cakd.build_distiller("baseline", cakd.build_student("resnet18", num_classes=10))
    losses = distiller(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    assert set(losses) == {"cls", "total"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cakd.build_student("resnet51"), r"unknown student 'resnet51': choose one of resnet18"),
        (lambda: cakd.build_teacher("vit_x_16"), r"unknown teacher 'vit_x_16': choose one of vit_b_16"),
        (lambda: cakd.build_distiller("fitnet", None), r"unknown recipe 'fitnet': choose one of baseline"),
        (lambda: cakd.build_teacher("vit_b_16", weights="IMAGENET9K"), r"unknown weights 'IMAGENET9K' for vit_b_16"),
        (lambda: cakd.build_distiller("cakd", None, None, pca_weight=1), r"unknown option\(s\) pca_weight"),
        (lambda: cakd.build_distiller("logits", cakd.build_student("resnet18")), r"the logits recipe needs a teacher"),
    ],
)
def test_unknown_names(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wrong_model_types(small_pair):
    student, teacher = small_pair
    with pytest.raises(TypeError, match="teacher must be a torchvision VisionTransformer or SwinTransformer"):
        cakd.build_distiller("cakd", student, student)
    with pytest.raises(ValueError, match="the cakd recipe distils into a CNN's feature map: use a CNN student"):
        cakd.build_distiller("cakd", teacher, teacher)


def test_missing_teacher_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher weights file .*nope.pth does not exist"):
        cakd.build_teacher("vit_b_16", weights=str(tmp_path / "nope.pth"))


def test_offline_download_names_the_cache_path(monkeypatch, tmp_path):
    """Offline, the enum download fails with one message saying where to put the file."""
    import urllib.error

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match=rf"put that file at {tmp_path}/hub/checkpoints/vit_b_16-c867db91.pth"):
        cakd.build_teacher("vit_b_16", weights="IMAGENET1K_V1")
