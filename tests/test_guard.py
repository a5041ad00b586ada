"""The guard: no code runs from torch's hub cache, divergence is told from a converged run's
noise, and a stop request is acted on within a few steps whatever ``--print-freq`` is."""
import hashlib
import os
import pickle

import pytest
import torch

import cakd
from cakd.weights import load_torchvision_weights


class Payload:
    """A pickle that runs ``touch MARKER`` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_file(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"heads.head.weight": Payload(marker)}, f, protocol=2)
    return path


def test_a_crafted_file_in_the_hub_cache_is_refused_by_its_hash(monkeypatch, tmp_path):
    """The very path the offline error names: a file there that is not torchvision's is refused
    before it is unpickled, and its payload never runs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "ran"
    cached = hostile_file(str(tmp_path / "hub" / "checkpoints" / "vit_b_16-c867db91.pth"), marker)
    with pytest.raises(ValueError, match=rf"{cached} is not the vit_b_16 IMAGENET1K_V1 file: its SHA-256 does not start with c867db91"):
        cakd.build_teacher("vit_b_16", weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_a_cached_file_whose_hash_matches_is_still_read_weights_only(monkeypatch, tmp_path):
    """Even a file whose SHA-256 matches its name (a hash prefix is 32 bits) is read with
    ``weights_only=True``: its payload is refused in one line, not run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "ran"
    staged = hostile_file(str(tmp_path / "staged.pth"), marker)
    digest = hashlib.sha256(open(staged, "rb").read()).hexdigest()
    name = f"vit_b_16-{digest[:8]}.pth"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.replace(staged, tmp_path / "hub" / "checkpoints" / name)
    with pytest.raises(ValueError, match=r"cannot be read \(it holds objects other than tensors"):
        load_torchvision_weights("vit_b_16", "IMAGENET1K_V1", f"https://download.pytorch.org/models/{name}")
    assert not marker.exists()


def test_a_cached_file_with_the_right_hash_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = {"fc.weight": torch.arange(6.0).reshape(2, 3)}
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(open(staged, "rb").read()).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.replace(staged, tmp_path / "hub" / "checkpoints" / name)
    loaded = load_torchvision_weights("resnet18", "IMAGENET1K_V1", f"https://download.pytorch.org/models/{name}")
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
