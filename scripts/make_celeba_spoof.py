"""Write a small generated data set in CelebA-Spoof's published layout, for the README's
anti-spoofing commands and the tests.

    python scripts/make_celeba_spoof.py OUT [--subjects 4] [--train-per-class 6] [--test-per-class 3]

``OUT/Data/{train,test}/<subject>/{live,spoof}/<n>.png``, each with ``<n>_BB.txt`` (``x y w h
score`` in a 224 x 224 frame of the image), and ``OUT/metas/intra_test/{train,test}_label.json``
(image path -> 44 labels, the last live 0 / spoof 1). A face is a box of noise around a colour: a
spoof's blue channel is raised (as a replayed screen's tint); outside the box, noise around a
colour of either kind, so only the face tells them apart.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from cakd.train.config import HelpFormatter

SPLITS = ("train", "test")


def make_celeba_spoof(root, subjects=4, train_per_class=6, test_per_class=3, size=(96, 80), seed=0):
    """Write the data set and return ``root``; ``size``: (width, height) of every image."""
    rng = np.random.RandomState(seed)
    width, height = size
    for split, per_class in zip(SPLITS, (train_per_class, test_per_class)):
        labels = {}
        for subject in range(subjects):
            subject_id = f"{(subject + 1) * 10 + (split == 'test') * 1000}"
            for kind, label in (("live", 0), ("spoof", 1)):
                folder = os.path.join(root, "Data", split, subject_id, kind)
                os.makedirs(folder, exist_ok=True)
                for i in range(per_class):
                    name = f"{len(labels):06d}"
                    x, y = rng.randint(0, 90), rng.randint(0, 90)  # the box in the 224 x 224 frame
                    w, h = rng.randint(100, 224 - x), rng.randint(100, 224 - y)
                    left, top = int(x * width / 224), int(y * height / 224)
                    right, bottom = left + int(w * width / 224), top + int(h * height / 224)
                    pixels = colour(rng, rng.randint(2)) + rng.randint(-40, 41, size=(height, width, 3))
                    pixels[top:bottom, left:right] = colour(rng, label) + rng.randint(-40, 41, size=(bottom - top, right - left, 3))
                    image = os.path.join(folder, f"{name}.png")
                    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image)
                    with open(os.path.join(folder, f"{name}_BB.txt"), "w") as f:
                        f.write(f"{x} {y} {w} {h} {rng.uniform(0.9, 1.0):.6f}\n")
                    labels[os.path.relpath(image, root)] = [0] * 43 + [label]
        metas = os.path.join(root, "metas", "intra_test")
        os.makedirs(metas, exist_ok=True)
        with open(os.path.join(metas, f"{split}_label.json"), "w") as f:
            json.dump(labels, f, indent=1)
    return root


def colour(rng, spoof):
    """A face's colour: a spoof's blue channel raised by 70."""
    return rng.randint(60, 150, size=3) + np.array([0, 0, 70 * spoof])


def get_args_parser():
    p = argparse.ArgumentParser(description="Write a small generated data set in CelebA-Spoof's layout", allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument("root", help="the folder to write (Data/ and metas/ go inside)")
    p.add_argument("--subjects", default=4, type=int, help="subject folders per split")
    p.add_argument("--train-per-class", default=6, type=int, help="live and spoof training images per subject")
    p.add_argument("--test-per-class", default=3, type=int, help="live and spoof test images per subject")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    make_celeba_spoof(args.root, args.subjects, args.train_per_class, args.test_per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
