"""The data, split as torchvision's classification reference splits it: the recipe's
transforms (:mod:`.presets`), the datasets on disk (:mod:`.datasets`, over image files read with
clear errors, :mod:`.images`; CelebA-Spoof: :mod:`.celeba_spoof`), and the samplers and loaders
(:mod:`.loaders`). What the trainer and the scripts use is importable from here."""
from .datasets import CACHE_FILE, ImageFolder, build_datasets, check_data_path, list_images, write_listing_cache
from .images import DataError, check_images, load_image
from .loaders import MixupCutmixCollate, RASampler, ShardSampler, build_loaders
from .presets import ClassificationPresetEval, ClassificationPresetTrain

__all__ = [
    "CACHE_FILE",
    "ClassificationPresetEval",
    "ClassificationPresetTrain",
    "DataError",
    "ImageFolder",
    "MixupCutmixCollate",
    "RASampler",
    "ShardSampler",
    "build_datasets",
    "build_loaders",
    "check_data_path",
    "check_images",
    "list_images",
    "load_image",
    "write_listing_cache",
]
