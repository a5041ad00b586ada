"""Datasets on disk: an ImageFolder with clear errors and a cached listing, torchvision's
CIFAR-100, and synthetic images, each through the recipe's presets (:mod:`.presets`).

Nothing here prints; the caller logs.
"""
import json
import os

import torch.distributed as dist
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

from ...weights import write_text_atomic
from ..distributed import is_dist, is_main_process
from .celeba_spoof import celeba_spoof
from .images import DataError, check_images, load_image
from .presets import ClassificationPresetEval, ClassificationPresetTrain

_LAYOUT = "ImageNet-style layout is DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG"


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder whose unreadable images raise :class:`DataError` with the path,
    listed by :func:`list_images` (links to folders refused), or taken from ``listing``
    (``(classes, samples)``, e.g. the dataset cache) without reading the folder."""

    def __init__(self, root, transform=None, listing=None):
        self.listing = listing
        super().__init__(root, transform=transform, loader=load_image)

    def find_classes(self, directory):
        if self.listing is None:
            return super().find_classes(directory)
        classes = list(self.listing[0])
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if self.listing is None:
            return list_images(directory, class_to_idx)
        return [(os.path.join(directory, path), label) for path, label in self.listing[1]]


def _class_folders(split_dir):
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _folder_tree(class_dir, seen):
    """``(folder, file names)`` of a class folder and its subfolders, each folder once.

    A link to a file is listed as a file. A link to a folder is refused: it leads back into the
    tree (a loop, walked again and again) or to another folder whose images would take this
    class's label. ``seen``: the real paths walked so far, so no folder is walked twice."""
    tree, stack = [], [class_dir]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise DataError(f"{folder} is {real}, a folder already listed (a link leads back into the data): remove the link")
        seen.add(real)
        files = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    entry.is_dir()
                except OSError as error:  # links that lead to each other
                    raise DataError(f"{entry.path} cannot be followed ({error.strerror}): a loop of links; remove it") from None
                if entry.is_dir() and entry.is_symlink():
                    raise DataError(
                        f"{entry.path} is a link to the folder {os.path.realpath(entry.path)}: links to folders are not "
                        "followed inside a class folder (a loop, or images of another class); link the image files instead"
                    )
                (stack.append(entry.path) if entry.is_dir() else files.append(entry.name))
        tree.append((folder, files))
    return tree


def list_images(split_dir, class_to_idx):
    """``(path, class index)`` of every image under ``split_dir/<class>/``, in torchvision's order
    (class, then folder path, then file name); a class folder without images is one DataError."""
    samples, empty, seen = [], [], set()
    for name in sorted(class_to_idx):
        found = [
            (os.path.join(folder, file), class_to_idx[name])
            for folder, files in sorted(_folder_tree(os.path.join(split_dir, name), seen))
            for file in sorted(files)
            if file.lower().endswith(IMG_EXTENSIONS)
        ]
        samples += found
        if not found:
            empty.append(name)
    if empty:
        raise DataError(
            f"{split_dir} has class folders with no images ({_few(empty)}): "
            f"put images ({', '.join(IMG_EXTENSIONS)}) in every class folder or remove the empty ones"
        )
    return samples


def check_data_path(data_path, what_to_pass):
    """The data path is a folder; else one DataError line that ends with ``what_to_pass``."""
    if not data_path:
        raise DataError(f"no data path given: {what_to_pass}")
    if not os.path.isdir(data_path):
        what = "is not a folder" if os.path.exists(data_path) else "does not exist"
        raise DataError(f"data path {data_path} {what}: {what_to_pass}")


def _check_layout(data_path):
    """Check DATA/{train,val}/<class>/ without listing the images; returns (train_dir, val_dir)."""
    check_data_path(data_path, "pass --data-path pointing at a folder with train/ and val/ (or use --dataset synthetic)")
    dirs = []
    for split in ("train", "val"):
        split_dir = os.path.join(data_path, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"{data_path} has no {split}/ folder: {_LAYOUT}")
        if not _class_folders(split_dir):
            raise DataError(f"{split_dir} has no class folders: {_LAYOUT}")
        dirs.append(split_dir)
    train_dir, val_dir = dirs
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"class folders of {train_dir} and {val_dir} differ "
            f"(only in train: {_few(only_train)}; only in val: {_few(only_val)}): "
            "both splits need the same <class> folders, since labels are their sorted order"
        )
    return train_dir, val_dir


def _few(names, limit=5):
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


CACHE_FILE = "dataset_cache.json"


def _fingerprint(split_dir):
    """What a cached listing was made from: the split folder's and each class folder's name,
    size and modification time (adding, removing or renaming a file changes its folder's)."""
    def stamp(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    return [stamp(split_dir)] + [[name, *stamp(os.path.join(split_dir, name))] for name in _class_folders(split_dir)]


def _read_cache(path):
    """The cache's entries (plain JSON: nothing in it can run), or {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _listing_fits(split_dir, classes, samples):
    """Whether a cached listing is one of ``split_dir`` as :func:`list_images` makes it: its
    classes are the folder's class folders, and each sample a relative path inside the folder of
    its own class, with a label of one of them (a crafted cache could name any file, or a label
    out of range)."""
    if classes != _class_folders(split_dir):
        return False
    for path, label in samples:
        if not 0 <= label < len(classes) or os.path.isabs(path):
            return False
        parts = os.path.normpath(path).split(os.sep)
        if parts[0] != classes[label] or ".." in parts or len(parts) < 2:
            return False
    return True


def _image_folder(split_dir, transform, cache_dir=None):
    """An ImageFolder over ``split_dir``; with ``cache_dir``, its listing (classes and files) is
    read from ``cache_dir/dataset_cache.json`` while the folder's fingerprint is unchanged, else
    listed and kept for :func:`write_listing_cache` (nothing is written before the run's checks pass)."""
    if not cache_dir:
        return ImageFolder(split_dir, transform=transform)
    path, key, fingerprint = os.path.join(cache_dir, CACHE_FILE), os.path.abspath(split_dir), _fingerprint(split_dir)
    entries = _read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint:
        try:
            classes, samples = [str(c) for c in entry["classes"]], [(str(p), int(label)) for p, label in entry["samples"]]
            if _listing_fits(split_dir, classes, samples):
                return ImageFolder(split_dir, transform=transform, listing=(classes, samples))
        except (KeyError, TypeError, ValueError):  # not what this function writes: list the folder again
            pass
    dataset = ImageFolder(split_dir, transform=transform)
    samples = [[os.path.relpath(p, split_dir), label] for p, label in dataset.samples]
    dataset.listing_to_cache = (path, key, {"fingerprint": fingerprint, "classes": dataset.classes, "samples": samples})
    return dataset


def write_listing_cache(*datasets):
    """Write the listings :func:`_image_folder` made (not read from the cache) into the cache
    file (by rank 0), once the run may write in its folder."""
    pending = [dataset.listing_to_cache for dataset in datasets if getattr(dataset, "listing_to_cache", None)]
    if not pending or not is_main_process():
        return
    path = pending[0][0]
    entries = _read_cache(path)
    for _, key, entry in pending:
        entries[key] = entry
    write_text_atomic(path, json.dumps(entries))


def _cifar100(root, download, train_transform, val_transform):
    """torchvision's own ``CIFAR100`` from ``root`` (its ``cifar-100-python/``), fetched first
    with ``download`` (by rank 0, the other ranks waiting)."""
    where = f"{root}/cifar-100-python/ (train, test, meta)"
    if download:
        try:
            if is_main_process():
                torchvision.datasets.CIFAR100(root, train=True, download=True)
        except OSError as error:  # URLError, no space, no permission
            raise DataError(f"could not download CIFAR-100 into {root} ({type(error).__name__}: {error}): put {where} there by hand") from None
        if is_dist():
            dist.barrier()
    try:
        train = torchvision.datasets.CIFAR100(root, train=True, transform=train_transform)
        val = torchvision.datasets.CIFAR100(root, train=False, transform=val_transform)
    except RuntimeError:  # "Dataset not found or corrupted"
        folder = os.path.join(root, torchvision.datasets.CIFAR100.base_folder)
        files = [name for name, _ in torchvision.datasets.CIFAR100.train_list + torchvision.datasets.CIFAR100.test_list]
        files.append(torchvision.datasets.CIFAR100.meta["filename"])
        if all(os.path.isfile(os.path.join(folder, name)) for name in files):
            raise DataError(
                f"{folder}/ holds {', '.join(files)} but they are not the CIFAR-100 release (their md5 sums differ, which "
                "torchvision checks): a damaged or other copy; delete the folder and pass --download, or put the original files there"
            ) from None
        raise DataError(
            f"no CIFAR-100 in {root}: expected {where}; pass --download to fetch it there (about 170 MB) "
            "or point --data-path at the folder that holds cifar-100-python/"
        ) from None
    return train, val


def build_datasets(dataset="imagefolder", data_path=None, *, train_crop_size=224, val_crop_size=224, val_resize_size=256,
                   interpolation="bilinear", auto_augment=None, ra_magnitude=9, augmix_severity=3, random_erase=0.0,
                   num_classes=None, synthetic_size=1024, download=False, cache_dir=None):
    """Return ``(train_dataset, val_dataset, num_classes)`` of ``dataset`` under ``data_path``,
    through the recipe's presets (the augmentation arguments: :class:`ClassificationPresetTrain`).

    ``num_classes``: the synthetic data's (1000 when None), a check of the folders' count else;
    ``synthetic_size``: its training images; ``download``: fetch CIFAR-100 first; ``cache_dir``:
    where an image folder's listing is cached (:func:`_image_folder`).
    """
    if dataset not in ("imagefolder", "cifar100", "synthetic", "celeba_spoof"):
        raise ValueError(f"unknown dataset {dataset!r}: use 'imagefolder', 'cifar100', 'synthetic' or 'celeba_spoof'")
    interpolation = InterpolationMode(interpolation)
    train_transform = ClassificationPresetTrain(
        crop_size=train_crop_size,
        interpolation=interpolation,
        auto_augment_policy=auto_augment,
        ra_magnitude=ra_magnitude,
        augmix_severity=augmix_severity,
        random_erase_prob=random_erase,
        padded_crop=32 if dataset == "cifar100" else None,
    )
    val_transform = ClassificationPresetEval(crop_size=val_crop_size, resize_size=val_resize_size, interpolation=interpolation)
    if dataset == "synthetic":  # random images through the recipe's presets, for smoke and throughput runs
        classes = 1000 if num_classes is None else num_classes
        shape = (3, train_crop_size, train_crop_size)
        train = torchvision.datasets.FakeData(synthetic_size, shape, classes, transform=train_transform)
        val_size = max(1, synthetic_size // 4)
        val = torchvision.datasets.FakeData(val_size, shape, classes, transform=val_transform, random_offset=synthetic_size)
        return train, val, classes
    if dataset == "cifar100":
        if not data_path:
            raise DataError("no data path given: pass --data-path, the folder that holds (or, with --download, will hold) cifar-100-python/")
        train, val = _cifar100(data_path, download, train_transform, val_transform)
        return train, val, len(train.classes)

    if dataset == "celeba_spoof":  # face anti-spoofing (Table 4): live / spoof, faces cut out by their boxes
        train, val = celeba_spoof(data_path, train_transform, val_transform)
        return train, val, len(train.classes)
    train_dir, val_dir = _check_layout(data_path)
    train = _image_folder(train_dir, train_transform, cache_dir)
    val = _image_folder(val_dir, val_transform, cache_dir)
    check_images(val)
    if num_classes is not None and num_classes != len(train.classes):
        raise DataError(
            f"--num-classes is {num_classes} but {train_dir} has {len(train.classes)} class folders: "
            "drop --num-classes (it is read from the folders) or fix the data"
        )
    return train, val, len(train.classes)
