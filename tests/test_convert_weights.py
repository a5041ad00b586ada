"""scripts/convert_weights.py: official / timm DeiT and Swin checkpoints into torchvision.

Tiny timm models (random, every tensor perturbed so that no zero-initialised head or bias
hides a wrong mapping) must give the same logits as the torchvision model filled with their
converted weights; the full-size key and shape maps are checked on the meta device.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import timm  # the "test" extra of setup.py
import torch
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

import cakd.zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("scripts_convert_weights", os.path.join(ROOT, "scripts", "convert_weights.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)
TINY_DEIT = dict(img_size=64, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=10)


def perturbed(model):
    """Seeded noise on every parameter: timm zero-initialises biases and the head."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def official_layout(model):
    """A timm Swin's state dict in the layout of microsoft/Swin-Transformer: merging at the end
    of stage i (timm: start of i + 1), ``head.*`` (timm: ``head.fc.*``), and the buffers the
    official model saves (relative position index, attention masks)."""
    state = {}
    for key, value in model.state_dict().items():
        merge = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if merge:
            key = f"layers.{int(merge.group(1)) - 1}.downsample.{merge.group(2)}"
        state[key.replace("head.fc.", "head.")] = value
    state.update({k: v for k, v in model.named_buffers() if k.endswith(convert.COMPUTED)})
    return state


@torch.no_grad()
def assert_same_logits(source, target, image_size):
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(target.eval()(images), source.eval()(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_swin_gives_timm_logits(layout):
    torch.manual_seed(0)
    source = perturbed(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **TINY_SWIN))
    state = source.state_dict() if layout == "timm" else official_layout(source)
    assert convert.swin_layout(state) == layout
    converted = convert.swin_to_torchvision(state)
    target = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                             window_size=[7, 7], num_classes=10)
    convert.load_converted(target, converted)
    assert_same_logits(source, target, 224)


def test_deit_gives_timm_logits():
    torch.manual_seed(0)
    source = perturbed(timm.create_model("deit_base_patch16_224", pretrained=False, **TINY_DEIT))
    converted = convert.deit_to_torchvision(source.state_dict())
    target = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    convert.load_converted(target, converted)
    assert_same_logits(source, target, 64)


@pytest.mark.parametrize("arch, layout", [("deit_b", "timm"), ("swin_l", "timm"), ("swin_l", "official")])
def test_full_size_keys_and_shapes(arch, layout):
    """The released sizes map onto cakd.teachers.vit.deit_b / cakd.teachers.swin.swin_l key for key, shape for shape."""
    name = {"deit_b": "deit_base_patch16_224", "swin_l": "swin_large_patch4_window7_224"}[arch]
    with torch.device("meta"):
        source = timm.create_model(name, pretrained=False)
        target = cakd.zoo.own_builders()[arch]()
    if arch == "deit_b":
        converted = convert.deit_to_torchvision(source.state_dict())
    else:
        state = source.state_dict() if layout == "timm" else official_layout(source)
        converted = convert.swin_to_torchvision(state)
    wanted = {k: tuple(v.shape) for k, v in target.state_dict().items() if not k.endswith(convert.COMPUTED)}
    assert {k: tuple(v.shape) for k, v in converted.items()} == wanted
    computed = set(target.state_dict()) - set(wanted)
    assert all(k.endswith("attn.relative_position_index") for k in computed) and len(computed) == (24 if arch == "swin_l" else 0)


def call(argv, capsys):
    """The script's main in this process: (exit status, stdout, stderr lines)."""
    code = convert.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def full_size(name, fill):
    """A released size's timm state dict, the shapes from the meta device (timm's own
    initialisation of a full-size model takes seconds), each tensor ``fill(shape)``."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    return {k: fill(shape) for k, shape in shapes.items()}


def test_script_writes_a_deit_b_that_loads_strictly(tmp_path, capsys):
    """A full-size random DeiT-B in the release's ``{"model": ...}`` wrapping, end to end, into the teacher."""
    generator = torch.Generator().manual_seed(0)
    state = full_size("deit_base_patch16_224", lambda shape: torch.randn(shape, generator=generator))
    torch.save({"model": state}, tmp_path / "deit.pth")
    out = tmp_path / "deit_b.pth"
    out.write_bytes(b"an older file")  # replaced, as asked with --force
    code, stdout, err = call(["--arch", "deit_b", "--input", tmp_path / "deit.pth", "--output", out, "--force"], capsys)
    assert code == 0 and err == [] and stdout.startswith(f"wrote {out}")
    model = cakd.build_teacher("deit_b", weights=str(out))  # loads strictly, as --teacher deit_b --teacher-weights OUT
    assert torch.equal(model.encoder.layers.encoder_layer_7.self_attention.in_proj_weight, state["blocks.7.attn.qkv.weight"])
    assert torch.equal(model.encoder.pos_embedding, state["pos_embed"])
    assert torch.equal(model.heads.head.bias, state["head.bias"])
    assert sorted(os.listdir(tmp_path)) == ["deit.pth", "deit_b.pth"]  # no temporary file left behind

    before = out.read_bytes()
    code, _, err = call(["--arch", "deit_b", "--input", tmp_path / "deit.pth", "--output", out], capsys)
    assert code == 1 and err == [f"error: {out} exists: pass --force to overwrite it"] and out.read_bytes() == before


def tiny_deit(distilled=False):
    name = "deit_base_distilled_patch16_224" if distilled else "deit_base_patch16_224"
    return timm.create_model(name, pretrained=False, **TINY_DEIT).state_dict()


BAD_INPUT = {
    "missing": ("deit_b", None, "input {input} does not exist: check the path"),
    "text file": ("deit_b", b"not a checkpoint", "cannot read {input} as a PyTorch checkpoint"),
    "not a state dict": ("deit_b", [1, 2, 3], "{input} is not a state dict"),
    "distilled DeiT": ("deit_b", lambda: {"model": tiny_deit(distilled=True)}, "key dist_token is a distilled DeiT's"),
    "DeiT for swin_l": ("swin_l", tiny_deit, "it holds DeiT / ViT weights (cls_token, blocks.*), not Swin: pass --arch deit_b"),
    "tiny DeiT for deit_b": ("deit_b", tiny_deit, "it holds a ViT of no released size (width 32, depth 3, MLP 64, patch 16), not DeiT-B"),
    "Swin-B for swin_l": ("swin_l", lambda: full_size("swin_base_patch4_window7_224", lambda shape: torch.zeros(()).expand(shape)),
                          "it holds Swin-B (embed dim 128, depths 2-2-18-2, heads 4-8-16-32, window 7, patch 4), "
                          "not Swin-L (embed dim 192, depths 2-2-18-2, heads 6-12-24-48, window 7, patch 4): pass a Swin-L checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(case, tmp_path, capsys):
    arch, contents, message = BAD_INPUT[case]
    path = tmp_path / "in.pth"
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif contents is not None:
        torch.save(contents() if callable(contents) else contents, path)
    code, stdout, err = call(["--arch", arch, "--input", path, "--output", tmp_path / "out.pth"], capsys)
    assert code == 1 and stdout == ""
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(input=path) in err[0], err
    assert not (tmp_path / "out.pth").exists()


def test_command_line_error_is_one_line(tmp_path):
    """Run as ``python scripts/convert_weights.py`` from a clone: one ``error:`` line, status 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), "--arch", "swin_l",
                             "--input", str(tmp_path / "none.pth"), "--output", str(tmp_path / "out.pth")],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: input {tmp_path / 'none.pth'} does not exist: check the path"]
    assert not (tmp_path / "out.pth").exists()
