"""The paper's multi-view generator (Eq. 7): a transformed view of some samples for the student.

With probability ``prob`` a sample is replaced, for the student only, by a view made with
one transform drawn uniformly per sample from: photometric jitter, random resized crop,
rotation, random patch mask, Gaussian noise; each transform's strength is drawn per sample.
The teacher keeps seeing the clean batch. It works on the normalized (B, 3, H, W) batch on
its device, inside the distiller's forward, and only in training mode. Samples left as they
are come back bit for bit; a view is clamped to the valid pixel range [0, 1] before it is
normalized again, as torchvision's transforms keep it.

Each transform can also be applied on its own to a whole batch, with strengths drawn per
image from a generator seeded by the image's index (:meth:`MultiViewGenerator.view`),
reproducible and independent of batch size, process count and torch's global generator: the
``train_views`` evaluation protocol. It is not the paper's noisy evaluation of Figure 3 (C4,
C5), which must differ from training: that is :mod:`cakd.corruptions`.

The paper names the transforms but not their strengths: the ranges below are our choice.
"""
import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.v2.functional import rgb_to_grayscale

from .students import IMAGENET_MEAN, IMAGENET_STD

TRANSFORMS = ("jitter", "crop", "rotate", "mask", "noise")  # a sample's transform: its index here
DRAW_ORDER = ("crop", "rotate", "jitter", "mask", "noise")  # the order training draws the strengths


def view_seed(seed, name, index):
    """The generator seed of image ``index`` under transform ``name``: 32 bits of a hash of
    the three (torch's CPU generator reads only a seed's low 32 bits)."""
    key = f"{int(seed)}/{name}/{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


class MultiViewGenerator(nn.Module):
    """``forward(images)`` returns the student's batch; random numbers come from torch's
    global generator, so a seeded or resumed run draws the same views. In each call they
    are drawn in this order: which samples are transformed (B uniforms), which transform
    (B integers in [0, 5), the index in :data:`TRANSFORMS`), then the strengths of every
    transform for every sample, transform by transform in :data:`DRAW_ORDER` (each a few
    B-uniforms; the noise a (B, 3, H, W) normal draw).

    Strengths (pixel values in [0, 1] before normalization):
    - jitter: brightness, contrast and saturation, each by a factor in [1 - jitter, 1 + jitter],
      in that order, clamped after each as torchvision's ``adjust_*`` functions;
    - crop: area ``crop_scale`` of the image, aspect ratio 3/4 to 4/3, resized back (bilinear);
    - rotate: an angle in [-max_rotation, max_rotation] degrees, zero (black) outside;
    - mask: one rectangle whose sides are ``mask_side`` fractions of the image's, set to black;
    - noise: ``noise_std`` Gaussian noise.
    """

    def __init__(
        self,
        prob: float = 0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        jitter: float = 0.4,
        crop_scale=(0.25, 1.0),
        max_rotation: float = 15.0,
        mask_side=(0.125, 0.5),
        noise_std: float = 0.1,
    ):
        super().__init__()
        self.prob = prob
        self.jitter = jitter
        self.crop_scale = crop_scale
        self.max_rotation = max_rotation
        self.mask_side = mask_side
        self.noise_std = noise_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        if not self.training or self.prob <= 0:
            return images
        batch, device = images.shape[0], images.device
        chosen = torch.rand(batch, device=device) < self.prob
        kind = torch.randint(len(TRANSFORMS), (batch,), device=device)
        is_kind = {name: (chosen & (kind == i)).view(batch, 1, 1, 1) for i, name in enumerate(TRANSFORMS)}

        pixels = images.float() * self.std + self.mean
        params = {name: self.draw(name, pixels.shape, device) for name in DRAW_ORDER}
        # crop and rotate share one resampling, identity for the other samples
        theta = torch.eye(2, 3, device=device).repeat(batch, 1, 1)
        for name in ("crop", "rotate"):
            theta = torch.where(is_kind[name].view(batch, 1, 1), params[name]["theta"], theta)
        out = torch.where(is_kind["crop"] | is_kind["rotate"], _warp(pixels, theta), pixels)
        for name in ("jitter", "mask", "noise"):
            out = torch.where(is_kind[name], self.apply(name, pixels, params[name]), out)

        views = ((out - self.mean) / self.std).to(images.dtype)
        return torch.where(chosen.view(batch, 1, 1, 1), views, images)

    def draw(self, name, shape, device, generator=None):
        """The strengths of transform ``name`` for a (B, 3, H, W) batch, as a dict of tensors
        on ``device``: from torch's global generator on ``device``, or from ``generator`` (a
        CPU generator) and moved to ``device``."""
        batch, _, height, width = shape
        where = "cpu" if generator is not None else device

        def uniform(low, high):
            return low + (high - low) * torch.rand(batch, device=where, generator=generator)

        if name == "crop":
            area = uniform(*self.crop_scale)
            log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
            crop_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
            crop_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
            theta = torch.zeros(batch, 2, 3, device=where)
            theta[:, 0, 0], theta[:, 1, 1] = crop_w, crop_h
            theta[:, 0, 2], theta[:, 1, 2] = uniform(-1, 1) * (1 - crop_w), uniform(-1, 1) * (1 - crop_h)
            params = {"theta": theta}
        elif name == "rotate":
            angle = uniform(-self.max_rotation, self.max_rotation) * (math.pi / 180)
            cos, sin = angle.cos(), angle.sin()
            theta = torch.zeros(batch, 2, 3, device=where)
            theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
            theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
            params = {"theta": theta}
        elif name == "jitter":
            params = {"factors": torch.stack([uniform(1 - self.jitter, 1 + self.jitter) for _ in range(3)], dim=1)}
        elif name == "mask":
            side_h, side_w = uniform(*self.mask_side) * height, uniform(*self.mask_side) * width
            top, left = uniform(0, 1) * (height - side_h), uniform(0, 1) * (width - side_w)
            params = {"box": torch.stack([top, left, side_h, side_w], dim=1)}
        elif name == "noise":
            params = {"noise": torch.randn(shape, device=where, generator=generator)}
        else:
            raise ValueError(f"unknown transform {name!r}: one of {', '.join(TRANSFORMS)}")
        return {key: value.to(device) for key, value in params.items()}

    def apply(self, name, pixels, params):
        """Transform ``name`` with strengths ``params`` (from :meth:`draw`) on every image of
        ``pixels`` ((B, 3, H, W), values in [0, 1]); the result is clamped to [0, 1]."""
        batch, _, height, width = pixels.shape
        if name in ("crop", "rotate"):
            return _warp(pixels, params["theta"])
        if name == "jitter":
            brightness, contrast, saturation = (f.view(batch, 1, 1, 1) for f in params["factors"].unbind(dim=1))
            out = _blend(pixels, 0.0, brightness)
            out = _blend(out, rgb_to_grayscale(out).mean(dim=(-2, -1), keepdim=True), contrast)
            return _blend(out, rgb_to_grayscale(out), saturation)
        if name == "mask":
            top, left, side_h, side_w = (v.view(-1, 1, 1) for v in params["box"].unbind(dim=1))
            rows = torch.arange(height, device=pixels.device).view(1, height, 1)
            cols = torch.arange(width, device=pixels.device).view(1, 1, width)
            inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
            return torch.where(inside.unsqueeze(1), torch.zeros_like(pixels), pixels).clamp(0.0, 1.0)
        if name == "noise":
            return (pixels + self.noise_std * params["noise"]).clamp(0.0, 1.0)
        raise ValueError(f"unknown transform {name!r}: one of {', '.join(TRANSFORMS)}")

    @torch.no_grad()
    def view(self, images, name, indices, seed=0):
        """Transform ``name`` applied to every image of the normalized batch ``images``, the
        strengths of image ``indices[i]`` drawn from a CPU generator seeded with
        :func:`view_seed` ``(seed, name, indices[i])``: the same view of an image whatever
        batch or process it is in; torch's global generator is left alone."""
        shape = (1,) + tuple(images.shape[1:])
        drawn = [self.draw(name, shape, "cpu", torch.Generator().manual_seed(view_seed(seed, name, i))) for i in indices]
        params = {key: torch.cat([d[key] for d in drawn]).to(images.device) for key in drawn[0]}
        pixels = images.float() * self.std + self.mean
        return ((self.apply(name, pixels, params) - self.mean) / self.std).to(images.dtype)

    def extra_repr(self):
        return f"prob={self.prob}, transforms={', '.join(TRANSFORMS)}"


def _warp(pixels, theta):
    """Bilinear resampling of each image by its affine ``theta`` (zero outside), clamped to [0, 1]."""
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.clamp(0.0, 1.0)


def _blend(image, other, ratio):
    """``ratio * image + (1 - ratio) * other`` clamped to [0, 1], as torchvision's ``_blend``."""
    return (ratio * image + (1.0 - ratio) * other).clamp(0.0, 1.0)

