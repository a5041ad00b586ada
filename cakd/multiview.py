"""The paper's multi-view generator (Eq. 7): a transformed view of some samples for the student.

With probability ``prob`` a sample is replaced, for the student only, by a view made with
one transform drawn uniformly per sample from: photometric jitter, random resized crop,
rotation, random patch mask, Gaussian noise; each transform's strength is drawn per sample.
The teacher keeps seeing the clean batch. It works on the normalized (B, 3, H, W) batch on
its device, inside the distiller's forward, and only in training mode. Samples left as they
are come back bit for bit.

The paper names the transforms but not their strengths: the ranges below are our choice.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .models import IMAGENET_MEAN, IMAGENET_STD

TRANSFORMS = ("jitter", "crop", "rotate", "mask", "noise")


class MultiViewGenerator(nn.Module):
    """``forward(images)`` returns the student's batch; random numbers come from torch's
    global generator, so a seeded or resumed run draws the same views.

    Strengths (pixel values in [0, 1] before normalization):
    - jitter: brightness, contrast and saturation, each by a factor in [1 - jitter, 1 + jitter];
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
        batch, _, height, width = images.shape
        device = images.device

        def uniform(low, high):
            return low + (high - low) * torch.rand(batch, device=device)

        def per_sample(flag):
            return flag.view(batch, 1, 1, 1)

        chosen = torch.rand(batch, device=device) < self.prob
        kind = torch.randint(len(TRANSFORMS), (batch,), device=device)
        is_kind = {name: chosen & (kind == i) for i, name in enumerate(TRANSFORMS)}

        pixels = images.float() * self.std + self.mean
        out = pixels

        # geometric transforms: one affine resampling, identity for the other samples
        theta = torch.eye(2, 3, device=device).repeat(batch, 1, 1)
        area = uniform(*self.crop_scale)
        log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
        crop_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        crop_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        crop = torch.zeros(batch, 2, 3, device=device)
        crop[:, 0, 0], crop[:, 1, 1] = crop_w, crop_h
        crop[:, 0, 2], crop[:, 1, 2] = uniform(-1, 1) * (1 - crop_w), uniform(-1, 1) * (1 - crop_h)
        angle = uniform(-self.max_rotation, self.max_rotation) * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        rotate = torch.zeros(batch, 2, 3, device=device)
        rotate[:, 0, 0], rotate[:, 0, 1] = cos, -sin * height / width
        rotate[:, 1, 0], rotate[:, 1, 1] = sin * width / height, cos
        theta = torch.where(is_kind["crop"].view(batch, 1, 1), crop, theta)
        theta = torch.where(is_kind["rotate"].view(batch, 1, 1), rotate, theta)
        grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
        warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = torch.where(per_sample(is_kind["crop"] | is_kind["rotate"]), warped, out)

        # photometric jitter: brightness, then contrast, then saturation
        factors = [uniform(1 - self.jitter, 1 + self.jitter).view(batch, 1, 1, 1) for _ in range(3)]
        jittered = pixels * factors[0]
        gray_mean = _grayscale(jittered).mean(dim=(-2, -1), keepdim=True)
        jittered = (jittered - gray_mean) * factors[1] + gray_mean
        gray = _grayscale(jittered)
        jittered = (jittered - gray) * factors[2] + gray
        out = torch.where(per_sample(is_kind["jitter"]), jittered, out)

        # one black rectangle
        side_h, side_w = uniform(*self.mask_side) * height, uniform(*self.mask_side) * width
        top, left = uniform(0, 1) * (height - side_h), uniform(0, 1) * (width - side_w)
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + side_h).view(-1, 1, 1))
        inside = inside & (cols >= left.view(-1, 1, 1)) & (cols < (left + side_w).view(-1, 1, 1))
        out = torch.where(per_sample(is_kind["mask"]) & inside.unsqueeze(1), torch.zeros_like(out), out)

        noisy = out + self.noise_std * torch.randn_like(out)
        out = torch.where(per_sample(is_kind["noise"]), noisy, out)

        views = ((out - self.mean) / self.std).to(images.dtype)
        return torch.where(per_sample(chosen), views, images)

    def extra_repr(self):
        return f"prob={self.prob}, transforms={', '.join(TRANSFORMS)}"


def _grayscale(pixels):
    """ITU-R 601 luma, as torchvision's ``rgb_to_grayscale``: (B, 1, H, W)."""
    r, g, b = pixels.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
