"""Write a small ImageNet-style folder of generated images, for the quickstart and the tests.

    python scripts/make_image_folder.py OUT [--classes 4] [--train-per-class 24] [--val-per-class 4] [--size 80]

``OUT/{train,val}/class_{k}/img_{i}.JPEG``: deterministic noise around a colour per class, so
a tiny run has something to learn.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

from cakd.train.config import HelpFormatter


def make_image_folder(root, num_classes=3, train_per_class=4, val_per_class=2, size=80, seed=0, fmt="JPEG"):
    """Write the folder and return ``root``."""
    rng = np.random.RandomState(seed)
    colours = rng.randint(0, 256, size=(num_classes, 3))
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(num_classes):
            folder = os.path.join(root, split, f"class_{k}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                noise = rng.randint(-60, 61, size=(size, size, 3))
                pixels = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}.{fmt}"), format=fmt)
    return root


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Write a small ImageNet-style folder of generated images",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("root", help="the folder to write (train/ and val/ go inside)")
    p.add_argument("--classes", default=4, type=int, help="class folders")
    p.add_argument("--train-per-class", default=24, type=int, help="training images per class")
    p.add_argument("--val-per-class", default=4, type=int, help="validation images per class")
    p.add_argument("--size", default=80, type=int, help="image side in pixels")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    make_image_folder(args.root, args.classes, args.train_per_class, args.val_per_class, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
