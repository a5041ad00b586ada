"""The recipe's transforms, as torchvision's classification reference writes them
(``references/classification/presets.py``), with ``torchvision.transforms.v2``."""
import torch
from torchvision.transforms import InterpolationMode, v2

from ...students import IMAGENET_MEAN, IMAGENET_STD


class ClassificationPresetTrain:
    """Training transform of the reference recipe: PIL image in, normalized (3, crop, crop) float out.

    ``padded_crop`` (small images such as CIFAR's 32x32): a random crop of that size after 4
    pixels of zero padding, then a resize to ``crop_size``, instead of the random resized crop.
    """

    def __init__(
        self,
        crop_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation=InterpolationMode.BILINEAR,
        hflip_prob=0.5,
        auto_augment_policy=None,
        ra_magnitude=9,
        augmix_severity=3,
        random_erase_prob=0.0,
        padded_crop=None,
    ):
        if padded_crop:
            transforms = [v2.RandomCrop(padded_crop, padding=4), v2.Resize(crop_size, interpolation=interpolation, antialias=True)]
        else:
            transforms = [v2.RandomResizedCrop(crop_size, interpolation=interpolation, antialias=True)]
        if hflip_prob > 0:
            transforms.append(v2.RandomHorizontalFlip(hflip_prob))
        if auto_augment_policy is not None:
            if auto_augment_policy == "ra":
                transforms.append(v2.RandAugment(interpolation=interpolation, magnitude=ra_magnitude))
            elif auto_augment_policy == "ta_wide":
                transforms.append(v2.TrivialAugmentWide(interpolation=interpolation))
            elif auto_augment_policy == "augmix":
                transforms.append(v2.AugMix(interpolation=interpolation, severity=augmix_severity))
            else:
                policy = v2.AutoAugmentPolicy(auto_augment_policy)
                transforms.append(v2.AutoAugment(policy=policy, interpolation=interpolation))
        transforms += [
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
        if random_erase_prob > 0:
            transforms.append(v2.RandomErasing(p=random_erase_prob))
        self.transforms = v2.Compose(transforms)

    def __call__(self, img):
        return self.transforms(img)

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms})"


class ClassificationPresetEval:
    """Evaluation transform: resize the short side, center crop, normalize."""

    def __init__(
        self,
        crop_size,
        resize_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation=InterpolationMode.BILINEAR,
    ):
        self.transforms = v2.Compose(
            [
                v2.Resize(resize_size, interpolation=interpolation, antialias=True),
                v2.CenterCrop(crop_size),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=mean, std=std),
            ]
        )

    def __call__(self, img):
        return self.transforms(img)

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms})"
