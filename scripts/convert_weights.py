"""An official DeiT-B or Swin-L release as a torchvision state dict for the teacher.

    python scripts/convert_weights.py --arch deit_b --input deit_base_patch16_224-b5f2ef4d.pth --output deit_b.pth
    python scripts/convert_weights.py --arch swin_l --input swin_large_patch4_window7_224_22kto1k.pth --output swin_l.pth

The input is in the layout of the releases (facebookresearch/deit, microsoft/Swin-Transformer)
or of timm 1.0, which moved Swin's patch merging to the start of the next stage; both are read,
told apart by their keys. The output loads with ``load_state_dict(strict=True)`` into
``cakd.teachers.vit.deit_b()`` / ``cakd.teachers.swin.swin_l()`` (the class count read from the head). Only
names change: every tensor keeps its values and shape, and every key must be consumed.
"""
import argparse
import math
import os
import re
import sys

import torch

from cakd.weights import load_error, load_strict, save_atomic
from cakd.teachers.swin import swin_l
from cakd.teachers.vit import deit_b
from cakd.train.config import HelpFormatter
from cakd.train.report import UserError, run_and_report
from cakd.train.scriptkit import check_output

BUILDERS = {"deit_b": deit_b, "swin_l": swin_l}  # what the output loads into

# Buffers the target builds itself from its window size; releases store some of them.
COMPUTED = ("relative_position_index", "attn_mask")

# timm / facebookresearch/deit VisionTransformer -> torchvision VisionTransformer.
# qkv is [q; k; v] stacked on the output dim in both, as nn.MultiheadAttention's in_proj.
DEIT_RULES = [
    (r"cls_token", r"class_token"),
    (r"pos_embed", r"encoder.pos_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"conv_proj.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.encoder_layer_\1.ln_1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.encoder_layer_\1.ln_2.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.layers.encoder_layer_\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.layers.encoder_layer_\1.mlp.3.\2"),
    (r"norm\.(weight|bias)", r"encoder.ln.\1"),
    (r"head\.(weight|bias)", r"heads.head.\1"),
]

# Inside a Swin block: official / timm name -> torchvision SwinTransformerBlock name.
SWIN_BLOCK = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
SWIN_FIXED = {
    "patch_embed.proj.weight": "features.0.0.weight",
    "patch_embed.proj.bias": "features.0.0.bias",
    "patch_embed.norm.weight": "features.0.2.weight",
    "patch_embed.norm.bias": "features.0.2.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}

# Named sizes, only to say what a file holds when it is not the one asked for.
SWIN_SIZES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "Swin-T",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "Swin-S",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "Swin-B",
    (192, (2, 2, 18, 2), (6, 12, 24, 48)): "Swin-L",
}
VIT_SIZES = {(192, 12, 768): "DeiT-Ti", (384, 12, 1536): "DeiT-S", (768, 12, 3072): "DeiT-B", (1024, 24, 4096): "ViT-L"}


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Convert an official DeiT-B / Swin-L checkpoint to a torchvision state dict",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--arch", required=True, choices=["deit_b", "swin_l"], help="the teacher the file is for")
    p.add_argument("--input", required=True, help="the released .pth (bare state dict, or under 'model' / 'state_dict')")
    p.add_argument("--output", required=True, help="the .pth file to write")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (default: off)")
    return p


def unknown_key(key, state, arch):
    """Why ``key`` cannot be converted, and what to pass instead."""
    if key in ("dist_token", "head_dist.weight", "head_dist.bias"):
        return ValueError(
            f"key {key} is a distilled DeiT's (distillation token and head), which is not supported: "
            "convert the non-distilled release (deit_base_patch16_224)"
        )
    if arch == "swin" and "cls_token" in state:
        return ValueError("it holds DeiT / ViT weights (cls_token, blocks.*), not Swin: pass --arch deit_b")
    if arch == "deit" and any(k.startswith("layers.") for k in state):
        return ValueError("it holds Swin weights (layers.*), not DeiT: pass --arch swin_l")
    release = {"deit": "deit_base_patch16_224", "swin": "swin_large_patch4_window7_224"}[arch]
    return ValueError(f"key {key} is not part of a {arch.capitalize()} checkpoint this converter knows: pass the official {release} release")


def deit_to_torchvision(state):
    """A DeiT / timm VisionTransformer state dict renamed for torchvision's VisionTransformer.

    Only keys are renamed; depth and width follow from whatever the file holds."""
    out = {}
    for key, value in state.items():
        for pattern, target in DEIT_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                out[match.expand(target)] = value
                break
        else:
            raise unknown_key(key, state, "deit")
    return out


def swin_layout(state):
    """``"official"`` (patch merging at the end of stage i, ``head.weight``) or ``"timm"``
    (merging at the start of stage i >= 1, ``head.fc.weight``). Stage 0 only has a merging
    layer in the official layout; without any merging layer (one stage) the head decides."""
    if any(k.startswith("layers.0.downsample.") for k in state):
        return "official"
    if any(re.match(r"layers\.\d+\.downsample\.", k) for k in state):
        return "timm"
    return "timm" if any(k.startswith("head.fc.") for k in state) else "official"


def swin_to_torchvision(state):
    """An official or timm Swin state dict renamed for torchvision's SwinTransformer.

    torchvision's ``features`` is [patch embed, stage 0, merge, stage 1, merge, ...]: stage i
    is ``features[2i+1]`` and the merging that follows it ``features[2i+2]``. The buffers in
    ``COMPUTED`` are dropped: load with ``load_converted``, which takes the target's own."""
    official = swin_layout(state) == "official"
    head = "head." if official else "head.fc."
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in COMPUTED:
            continue
        block = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        merge = re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", key)
        table = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", key)
        if block and block.group(3) in SWIN_BLOCK:
            stage, index, name, kind = block.groups()
            out[f"features.{2 * int(stage) + 1}.{index}.{SWIN_BLOCK[name]}.{kind}"] = value
        elif table:
            stage, index = table.groups()
            out[f"features.{2 * int(stage) + 1}.{index}.attn.relative_position_bias_table"] = value
        elif merge:
            stage, name = int(merge.group(1)), merge.group(2)
            out[f"features.{2 * stage + 2 if official else 2 * stage}.{name}"] = value
        elif key in SWIN_FIXED:
            out[SWIN_FIXED[key]] = value
        elif key in (head + "weight", head + "bias"):
            out["head." + key.rsplit(".", 1)[-1]] = value
        else:
            raise unknown_key(key, state, "swin")
    return out


def load_converted(model, state, what="the converted weights", fix="this is a bug, please report it"):
    """``load_state_dict(strict=True)``, the buffers in ``COMPUTED`` taken from ``model`` itself."""
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in COMPUTED}
    load_strict(model, {**state, **own}, what, fix)
    return model


def swin_config(state):
    """(embed dim, depths, heads, window, patch) of a torchvision-layout Swin state dict."""
    if "features.0.0.weight" not in state:
        raise ValueError("it has no patch embedding (patch_embed.proj.weight): pass a full Swin checkpoint")
    depths, heads, windows = {}, {}, set()
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.(\d+)\.attn\.relative_position_bias_table", key)
        if match:
            stage = (int(match.group(1)) - 1) // 2
            depths[stage] = depths.get(stage, 0) + 1
            heads[stage] = value.shape[1]
            windows.add((math.isqrt(value.shape[0]) + 1) // 2)
    stages = sorted(depths)
    embed, _, patch, _ = state["features.0.0.weight"].shape
    return embed, tuple(depths[s] for s in stages), tuple(heads[s] for s in stages), tuple(sorted(windows)), patch


def describe_swin(config):
    embed, depths, heads, windows, patch = config
    name = SWIN_SIZES.get((embed, depths, heads), "a Swin of no released size")
    return (
        f"{name} (embed dim {embed}, depths {'-'.join(map(str, depths))}, heads {'-'.join(map(str, heads))}, "
        f"window {'/'.join(map(str, windows))}, patch {patch})"
    )


def vit_config(state):
    """(width, depth, MLP width, patch, token grid) of a torchvision-layout ViT state dict."""
    for key in ("conv_proj.weight", "encoder.pos_embedding", "encoder.layers.encoder_layer_0.mlp.0.weight"):
        if key not in state:
            raise ValueError(f"it lacks {key} (as torchvision names it): pass a full DeiT checkpoint")
    depth = sum(1 for k in state if re.fullmatch(r"encoder\.layers\.encoder_layer_\d+\.ln_1\.weight", k))
    width, _, patch, _ = state["conv_proj.weight"].shape
    patches = state["encoder.pos_embedding"].shape[1] - 1  # the class token has a position too
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"its position embedding has {patches} patch positions, not a square grid: pass a DeiT without extra tokens")
    return width, depth, state["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0], patch, grid


def describe_vit(config):
    width, depth, mlp, patch, grid = config
    name = VIT_SIZES.get((width, depth, mlp), "a ViT of no released size")
    return f"{name} (width {width}, depth {depth}, MLP {mlp}, patch {patch})"


def to_target(arch, converted):
    """The cakd teacher filled with ``converted``; a file of another size is refused by name,
    from a shape-only (meta) target, before the real one is built and initialised."""
    head = "head.weight" if arch == "swin_l" else "heads.head.weight"
    if head not in converted:
        raise ValueError("it has no classifier head (a headless checkpoint): pass the release with its ImageNet head")
    num_classes = converted[head].shape[0]
    if arch == "swin_l":
        found = swin_config(converted)
        with torch.device("meta"):
            wanted = swin_config(swin_l(num_classes).state_dict())
        if found != wanted:
            raise ValueError(f"it holds {describe_swin(found)}, not {describe_swin(wanted)}: pass a Swin-L checkpoint")
        model = swin_l(num_classes)
    else:
        found = vit_config(converted)
        image_size = found[3] * found[4]  # a release at 384 keeps its resolution
        with torch.device("meta"):
            wanted = vit_config(deit_b(num_classes, image_size).state_dict())
        if found[:4] != wanted[:4]:
            raise ValueError(f"it holds {describe_vit(found)}, not {describe_vit(wanted)}: pass a DeiT-B checkpoint")
        model = deit_b(num_classes, image_size)
    return load_converted(model, converted, f"it does not fit {BUILDERS[arch].__module__}.{arch}", "pass an unmodified official release")


def read_state_dict(path):
    """The tensors of a checkpoint: bare, or under ``model`` / ``state_dict`` as released."""
    if not os.path.isfile(path):
        raise UserError(f"input {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not a checkpoint we can read"
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({load_error(error)}): pass the released .pth file") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict (a dict of tensors, bare or under 'model' / 'state_dict'): pass the released .pth file")
    return state


def run(args):
    check_output(args.output, args.input, args.force)
    state = read_state_dict(args.input)
    try:
        if args.arch == "swin_l":
            layout = f"{swin_layout(state)} Swin layout"
            converted = swin_to_torchvision(state)
        else:
            layout = "DeiT / timm layout"
            converted = deit_to_torchvision(state)
        model = to_target(args.arch, converted)
    except (ValueError, UserError) as error:
        raise UserError(f"{args.input}: {error}") from None
    save_atomic(model.state_dict(), args.output)
    print(f"wrote {args.output}: {args.arch} ({layout}, {len(state)} keys read), loads strictly into {BUILDERS[args.arch].__module__}.{args.arch}")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
