"""ResNet50x2, the paper's doubled ResNet-50 student: its size, its tap, its exported weights."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cakd
from cakd.students import student_layout
from cakd.teachers.registry import token_grid
from cakd.zoo import architecture, check_pair
from cakd.train.config import get_args_parser


@pytest.fixture(scope="module")
def meta_students():
    """resnet50 and resnet50x2 on the meta device: shapes and counts, no memory."""
    with torch.device("meta"):
        return {name: cakd.build_student(name) for name in ("resnet50", "resnet50x2")}


def multiply_adds(model, image_size=224):
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops() / 2  # torch counts a multiply-add as 2 FLOPs


def test_multiply_adds_are_the_papers(meta_students):
    """The paper's 15.9 G for ResNet50x2 beside its 4.1 G for ResNet-50, at 224."""
    macs = {name: multiply_adds(model) for name, model in meta_students.items()}
    print(f"multiply-adds at 224: resnet50 {macs['resnet50'] / 1e9:.3f} G, resnet50x2 {macs['resnet50x2'] / 1e9:.3f} G")
    assert abs(macs["resnet50"] / 4.1e9 - 1) < 0.03
    assert abs(macs["resnet50x2"] / 15.9e9 - 1) < 0.03


def test_every_width_is_doubled(meta_students):
    """Stem, inner widths and stage outputs all twice ResNet-50's (wide_resnet50_2 doubles
    the inner widths only); 98.0 M parameters, 93.9 M without the 1000-class head."""
    layouts = {name: student_layout(model, 224, name) for name, model in meta_students.items()}
    for (name, channels, *grid), (name_x2, channels_x2, *grid_x2) in zip(layouts["resnet50"].stages, layouts["resnet50x2"].stages):
        assert (name, 2 * channels, grid) == (name_x2, channels_x2, grid_x2)
    single, double = meta_students["resnet50"], meta_students["resnet50x2"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert getattr(double, stage)[0].conv2.out_channels == 2 * getattr(single, stage)[0].conv2.out_channels
    params = sum(p.numel() for p in double.parameters())
    print(f"resnet50x2 parameters: {params:,} ({params - double.fc.weight.numel() - double.fc.bias.numel():,} without the head)")
    assert params == 98_004_072
    assert layouts["resnet50x2"].pooled_dim == 4096


def test_grid_rule_taps_layer3_for_vit_b_16(meta_students):
    with torch.device("meta"):
        grid = token_grid(architecture("vit_b_16", image_size=224), 224)
    assert grid == 14
    assert student_layout(meta_students["resnet50x2"], 224, "resnet50x2").stage_for(grid) == ("layer3", 2048)
    check_pair("resnet50x2", "vit_b_16", 224)  # the trainer's check before it builds anything


def test_trainer_takes_it():
    assert get_args_parser().parse_args(["--model", "resnet50x2"]).model == "resnet50x2"


def test_exported_weights_load_back(tmp_path):
    """``cakd.export_student`` of a resnet50x2 loads strictly into a fresh one, and through a
    ``.pth`` file as ``build_student``'s weights; both compute what the original computes."""
    torch.manual_seed(0)
    model = cakd.build_student("resnet50x2", num_classes=10).eval()
    state = cakd.export_student(model)
    fresh = cakd.build_student("resnet50x2", num_classes=10).eval()
    fresh.load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "resnet50x2.pth")
    del state
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        assert expected.shape == (2, 10)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)
        del fresh
        loaded = cakd.build_student("resnet50x2", num_classes=10, weights=str(tmp_path / "resnet50x2.pth")).eval()
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)


def test_no_torchvision_weights_is_said():
    with torch.device("meta"), pytest.raises(ValueError, match=r"^torchvision has no resnet50x2 weights: pass the \.pth file$"):
        cakd.build_student("resnet50x2", weights="IMAGENET1K_V1")
