"""COCO 2017 in its standard layout through torchvision's ``CocoDetection`` and the v2 transforms
(torchvision's ``references/detection``): the training images with at least one usable box, a
horizontal flip for training; resizing (shorter side ``min_size``, longer at most ``max_size``)
is the detector's own transform. Labels are COCO's category ids (the detector has max id + 1 classes).
"""
import os

import torch
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torchvision.transforms import v2

from ..train.data import DataError, ShardSampler
from ..train.report import UserError
from ..train.seeds import SeededCollate, SeededDataset, SeededSampler
from ..train.signals import worker_init

SPLITS = {"train": ("train2017", "annotations/instances_train2017.json"), "val": ("val2017", "annotations/instances_val2017.json")}
TARGET_KEYS = ("boxes", "labels", "masks", "image_id")


def need_pycocotools():
    """pycocotools (COCO's reference code) is an extra: one line saying how to get it."""
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise UserError("pycocotools is not installed, and COCO data and evaluation need it: pip install pycocotools "
                        "(or pip install -e '.[detection]')") from None


def transforms(train):
    """Image to a float tensor in [0, 1] (the detector normalizes and resizes); flip for training."""
    steps = [v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(), v2.ToPureTensor()]
    return v2.Compose(steps)


def has_usable_box(coco, image_id):
    """Whether the image has an annotation with a box of positive width and height (the
    reference trains only on those)."""
    return any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in coco.imgToAnns[image_id])


def coco_dataset(data_path, split, with_masks):
    """``split`` ("train" or "val") of COCO 2017 under ``data_path``; one :class:`DataError` line
    for a missing folder or annotation file."""
    folder, annotations = (os.path.join(data_path, part) for part in SPLITS[split])
    for path in (folder, annotations):
        if not os.path.exists(path):
            raise DataError(f"{path} does not exist: --data-path must hold COCO 2017's train2017/, val2017/ and "
                            "annotations/instances_{train,val}2017.json")
    try:
        dataset = torchvision.datasets.CocoDetection(folder, annotations, transforms=transforms(split == "train"))
    except ValueError as error:  # json.JSONDecodeError: not JSON
        raise DataError(f"{annotations} is not a COCO annotation file ({error})") from None
    if split == "train":
        dataset.ids = [i for i in dataset.ids if has_usable_box(dataset.coco, i)]
    keys = TARGET_KEYS if with_masks else tuple(k for k in TARGET_KEYS if k != "masks")
    return torchvision.datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=keys)


def collate(batch):
    """A batch as a tuple of images and a tuple of targets (images keep their own sizes)."""
    return tuple(zip(*batch))


def build_loaders(train_set, val_set, *, batch_size, workers=0, seed=0, distributed=False):
    """``(train_loader, val_loader)``. The training order and each image's flip are pure functions
    of (seed, epoch, rank, position) (:mod:`cakd.train.seeds`): its sampler's ``start`` resumes
    mid-epoch exactly. Validation shards every image to exactly one rank, in order."""
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=seed, **({} if distributed else {"num_replicas": 1, "rank": 0}))
    pin_memory = torch.cuda.is_available()
    train_loader = DataLoader(
        SeededDataset(train_set), batch_size=batch_size, sampler=SeededSampler(train_sampler, seed=seed, rank=train_sampler.rank),
        num_workers=workers, pin_memory=pin_memory, collate_fn=SeededCollate(collate), worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(
        val_set, batch_size=batch_size, sampler=ShardSampler(val_set) if distributed else SequentialSampler(val_set),
        num_workers=workers, pin_memory=pin_memory, collate_fn=collate, worker_init_fn=worker_init,
    )
    return train_loader, val_loader
