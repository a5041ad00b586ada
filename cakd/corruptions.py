"""Noisy evaluation for the paper's Figure 3 (C4, C5): a fixed corruption protocol.

The paper evaluates C4 and C5 on a validation set "augmented differently from training" and
gives no protocol. Ours: five corruptions that the multi-view generator (:mod:`cakd.multiview`:
colour jitter, crop, rotation, patch mask, Gaussian noise) never applies, each at one fixed
severity, all from ``torchvision.transforms.v2.functional``:

- ``blur``: Gaussian blur, sigma 1.5 px at 224 px (scaled with the image side), kernel 6 sigma wide;
- ``jpeg``: JPEG compression at quality 15;
- ``pixelate``: down to a quarter of the side (area), back up with nearest-neighbour;
- ``elastic``: elastic distortion, torchvision's ``ElasticTransform`` with alpha 50 px and
  sigma 5 px at 224 px (scaled with the side): the one corruption with a random draw;
- ``posterize``: 3 bits per channel.

Image ``i``'s random draw comes from a CPU generator seeded by ``(seed, corruption, i)``
(:func:`cakd.multiview.view_seed`): a rerun, another batch size or another process count
gives the same images, and torch's global generator is left alone. The training transforms
stay available as the ``train_views`` protocol (:data:`VIEW_PROTOCOLS`); they are not the
paper's protocol, since C5 trained on them.
"""
import math

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .students import IMAGENET_MEAN, IMAGENET_STD
from .multiview import TRANSFORMS, MultiViewGenerator, view_seed

CORRUPTIONS = ("blur", "jpeg", "pixelate", "elastic", "posterize")


class Corruptions(nn.Module):
    """``view(images, name, indices, seed)``: corruption ``name`` applied to every image of a
    normalized (B, 3, H, W) batch, back in the same normalization (the interface of
    :meth:`cakd.multiview.MultiViewGenerator.view`). Severities are in pixels at
    ``reference_size`` and scale with the image's side."""

    names = CORRUPTIONS

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=1.5, jpeg_quality=15, pixelate_factor=4,
                 elastic_alpha=50.0, elastic_sigma=5.0, posterize_bits=3, reference_size=224):
        super().__init__()
        self.blur_sigma, self.jpeg_quality, self.pixelate_factor = blur_sigma, jpeg_quality, pixelate_factor
        self.elastic_alpha, self.elastic_sigma, self.posterize_bits = elastic_alpha, elastic_sigma, posterize_bits
        self.reference_size = reference_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def view(self, images, name, indices, seed=0):
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}: one of {', '.join(CORRUPTIONS)}")
        pixels = (images.float() * self.std + self.mean).clamp(0.0, 1.0)
        scale = images.shape[-1] / self.reference_size
        if name == "blur":
            sigma = self.blur_sigma * scale
            out = TF.gaussian_blur(pixels, [_odd(6 * sigma)] * 2, [sigma, sigma])
        elif name == "jpeg":
            out = _from_uint8(TF.jpeg(_to_uint8(pixels).cpu(), self.jpeg_quality).to(images.device))
        elif name == "pixelate":
            height, width = pixels.shape[-2:]
            small = [max(1, height // self.pixelate_factor), max(1, width // self.pixelate_factor)]
            out = TF.resize(TF.resize(pixels, small, antialias=True), [height, width], TF.InterpolationMode.NEAREST)
        elif name == "elastic":
            displacement = self.displacement(pixels.shape, scale, seed, indices)
            out = torch.cat([TF.elastic(image[None], field[None]) for image, field in zip(pixels, displacement)])
        else:
            out = _from_uint8(TF.posterize(_to_uint8(pixels), self.posterize_bits))
        return ((out.clamp(0.0, 1.0) - self.mean) / self.std).to(images.dtype)

    def displacement(self, shape, scale, seed, indices):
        """torchvision ``ElasticTransform``'s displacement fields (B, H, W, 2) on the images'
        device, image ``indices[i]``'s uniform draws from its own generator."""
        batch, _, height, width = shape
        draws = [torch.rand(2, height, width, generator=torch.Generator().manual_seed(view_seed(seed, "elastic", i)))
                 for i in indices]
        sigma, alpha = self.elastic_sigma * scale, self.elastic_alpha * scale
        fields = TF.gaussian_blur(torch.stack(draws).to(self.mean.device) * 2 - 1, [_odd(8 * sigma)] * 2, [sigma, sigma])
        fields = fields * alpha / torch.tensor([width, height], device=fields.device).view(1, 2, 1, 1)  # x by width, y by height
        return fields.permute(0, 2, 3, 1)

    def extra_repr(self):
        return (f"blur_sigma={self.blur_sigma}, jpeg_quality={self.jpeg_quality}, pixelate_factor={self.pixelate_factor}, "
                f"elastic_alpha={self.elastic_alpha}, elastic_sigma={self.elastic_sigma}, posterize_bits={self.posterize_bits}")


class TrainViews(MultiViewGenerator):
    """The multi-view generator's own training transforms, each on every image: not the
    paper's protocol (C5 trained on them), kept to compare with earlier numbers."""

    names = TRANSFORMS


# --views / --eval-views protocols: the paper's noisy evaluation, and the training transforms
VIEW_PROTOCOLS = {"corruptions": Corruptions, "train_views": TrainViews}


def _odd(size):
    return max(3, int(math.ceil(size)) // 2 * 2 + 1)


def _to_uint8(pixels):
    return (pixels * 255).round().to(torch.uint8)


def _from_uint8(pixels):
    return pixels.float() / 255
