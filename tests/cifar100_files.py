"""A tiny CIFAR-100 in torchvision's on-disk format, and the one check it cannot pass: the md5
sums of the real files (a generated file cannot have them).

    python tests/cifar100_files.py ROOT       writes ROOT/cifar-100-python/{train,test,meta}
"""
import os
import pickle
import sys

import numpy as np


def make_cifar100(root, train_per_class=2, test_per_class=1, num_classes=100, seed=0):
    """Write ``root/cifar-100-python/{train,test,meta}``: pickles with the keys torchvision's
    ``CIFAR100`` reads (``data`` (N, 3072) uint8 in CHW order, ``fine_labels``, ``coarse_labels``,
    ``filenames``; ``fine_label_names`` in ``meta``). Images are noise around a colour per class."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    colours = rng.randint(0, 256, size=(num_classes, 3, 1, 1))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [k for k in range(num_classes) for _ in range(per_class)]
        noise = rng.randint(-40, 41, size=(len(labels), 3, 32, 32))
        images = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
        entry = {
            "data": images.reshape(len(labels), -1),
            "fine_labels": labels,
            "coarse_labels": [k // 5 for k in labels],
            "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{split} batch",
        }
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(entry, f)
    meta = {"fine_label_names": [f"class_{k}" for k in range(num_classes)], "coarse_label_names": [f"super_{k}" for k in range(20)]}
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f)
    return root


def files_only(fpath, md5=None):
    """torchvision's ``check_integrity`` without the md5 sum: the file must exist."""
    return os.path.isfile(fpath)


def skip_md5_check():
    """Replace torchvision's CIFAR integrity check by :func:`files_only` in this process."""
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = files_only


if __name__ == "__main__":
    make_cifar100(sys.argv[1])
