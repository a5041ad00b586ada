"""A tiny CIFAR-100 in torchvision's on-disk format, and a launcher that skips only the md5
check of the real files (a generated file cannot have the real checksums).

    python tests/cifar100_files.py ROOT                  writes ROOT/cifar-100-python/{train,test,meta}
    python tests/cifar100_files.py --run ARGS...         runs ``python -m cakd.train ARGS`` without the md5 check
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


def skip_md5_check():
    """torchvision checks the real files' md5 sums; keep every other check (the files must exist)."""
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        skip_md5_check()
        from cakd.train.trainer import main

        sys.exit(main(sys.argv[2:]))
    make_cifar100(sys.argv[1])
