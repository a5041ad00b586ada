import os
import sys

import pytest
import torch
from torchvision.models import VisionTransformer

import cakd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))


def tiny_vit(image_size=64, patch_size=16, hidden_dim=32, num_heads=2, num_classes=10, num_layers=2):
    torch.manual_seed(1)
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=2 * hidden_dim,
        num_classes=num_classes,
    ).eval()


@pytest.fixture
def small_pair():
    """resnet18 + a narrow ViT at 64x64 / patch 16: the same 4x4 grid as ResNet layer3."""
    torch.manual_seed(0)
    return cakd.build_student("resnet18", num_classes=10), tiny_vit()


@pytest.fixture
def batch():
    torch.manual_seed(2)
    return torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
