"""CelebA-Spoof (Zhang et al., ECCV 2020) in its published layout, for face anti-spoofing (the
paper's Table 4): two classes, live (0) and spoof (1).

    DATA/Data/train/<subject>/live|spoof/<image>     and <image stem>_BB.txt beside each image
    DATA/Data/test/<subject>/live|spoof/<image>
    DATA/metas/intra_test/train_label.json           {"Data/train/.../<image>": [44 labels], ...}
    DATA/metas/intra_test/test_label.json

The last of an image's 44 labels is live 0 / spoof 1. Its box file holds ``x y w h score`` in a
224 x 224 frame of the image; the face is cut out by that box, scaled to the image's size,
before the transforms, as the data set's authors do.
"""
import json
import os


from ..distributed import get_rank, get_world_size
from .images import DataError, check_images, load_image

CLASSES = ("live", "spoof")
LABEL_FILES = {"train": "metas/intra_test/train_label.json", "test": "metas/intra_test/test_label.json"}
LAYOUT = ("CelebA-Spoof layout is DATA/Data/train|test/<subject>/live|spoof/<image> with <image>_BB.txt beside "
          "each, and DATA/metas/intra_test/train_label.json and test_label.json")


def box_path(image_path):
    """``<image stem>_BB.txt`` beside the image."""
    return os.path.splitext(image_path)[0] + "_BB.txt"


def read_box(path):
    """``(x, y, w, h)`` in the 224 x 224 frame from a box file (``x y w h score``); a file that is
    missing or does not hold a box of positive size is one DataError naming it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise DataError(f"cannot read face box file {path} ({type(error).__name__}: {error.strerror}): "
                        "each image needs its <image>_BB.txt (x y w h score)") from None
    try:
        x, y, w, h = (float(v) for v in text.replace(",", " ").split()[:4])
    except ValueError:
        x = y = w = h = None
    if x is None or not w > 0 or not h > 0:
        shown = " ".join(text.split())[:60]
        raise DataError(f"face box file {path} does not parse as 'x y w h score' with w, h > 0 (it holds {shown!r}): "
                        "fix or replace it")
    return x, y, w, h


def crop_face(image, box):
    """The face of a PIL image by its box in the 224 x 224 frame: scaled to the image, truncated to
    whole pixels and clipped to it (at least one pixel kept)."""
    width, height = image.size
    x, y, w, h = box
    left, top = int(x * width / 224), int(y * height / 224)
    right, bottom = left + int(w * width / 224), top + int(h * height / 224)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
    return image.crop((left, top, right, bottom))


def read_labels(root, split):
    """``[(image path, 0 live / 1 spoof)]`` of ``split`` from its label file, sorted by path; a
    missing or malformed label file, or a listed image that is not there, is one DataError."""
    path = os.path.join(root, LABEL_FILES[split])
    if not os.path.isfile(path):
        raise DataError(f"label file {path} does not exist: {LAYOUT}")
    try:
        with open(path) as f:
            labels = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"label file {path} is not readable JSON ({type(error).__name__}: {error}): restore it") from None
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"label file {path} holds no {{image path: [44 labels]}} entries: restore it")
    samples = []
    for image, values in sorted(labels.items()):
        if not isinstance(values, list) or not values or values[-1] not in (0, 1):
            raise DataError(f"label file {path}: the entry of {image} does not end with live 0 / spoof 1 ({str(values)[:60]}): restore it")
        image_path = os.path.join(root, image)
        if not os.path.isfile(image_path):
            raise DataError(f"image {image_path}, listed in {path}, does not exist: restore it or point --data-path at the whole data set")
        samples.append((image_path, int(values[-1])))
    return samples


class CelebASpoof:
    """One split of CelebA-Spoof: ``(transform(face crop), 0 live / 1 spoof)`` per listed image."""

    classes = list(CLASSES)

    def __init__(self, root, split, transform=None):
        self.root, self.split, self.transform = root, split, transform
        self.samples = read_labels(root, split)
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        image = crop_face(load_image(path), read_box(box_path(path)))
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}({self.root}, {self.split}: {len(self)} images)"


def check_boxes(dataset):
    """Read the box of each image of this rank's test shard (``ShardSampler``'s share), so that a
    bad box file stops the run before the first epoch, not after it (its training unsaved)."""
    rank, world_size = get_rank(), get_world_size()
    for path, _ in dataset.samples[rank::world_size]:
        read_box(box_path(path))


def celeba_spoof(root, train_transform, val_transform):
    """``(train, test)`` datasets of CelebA-Spoof's intra-test protocol under ``root``; the test
    images' headers and boxes are read now (:func:`images.check_images`, :func:`check_boxes`)."""
    if not os.path.isdir(root or ""):
        raise DataError(f"data path {root} is not a folder: {LAYOUT}")
    train, test = CelebASpoof(root, "train", train_transform), CelebASpoof(root, "test", val_transform)
    check_images(test)
    check_boxes(test)
    return train, test
