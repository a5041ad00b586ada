"""Samplers and loaders: the reference recipe's repeated-augmentation sampler, a validation
shard per rank, MixUp/CutMix, and the seeded loaders a resumed run replays exactly."""
import math

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import v2

from ..distributed import get_rank, get_world_size
from ..seeds import SeededCollate, SeededDataset, SeededSampler
from ..signals import worker_init


class RASampler(torch.utils.data.Sampler):
    """Repeated-augmentation sampler (DeiT; torchvision's classification reference).

    Each index of an epoch's permutation (seeded with ``seed + epoch``) is repeated
    ``repetitions`` times and the list is dealt out over ``num_replicas`` ranks, so the copies
    of an image land on different ranks (or next to each other on one rank) and are augmented
    differently. Each rank has ``num_samples = ceil(len(dataset) * repetitions / num_replicas)``
    of them but, as in the reference, yields only the first
    ``num_selected_samples = floor(len(dataset) // 256 * 256 / num_replicas)``: an epoch stays
    about ``len(dataset)`` images long. Fallback (not in the reference): a dataset under 256
    images would give 0, so it yields ``ceil(len(dataset) / num_replicas)`` instead and tiny
    smoke runs still train.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, repetitions=3):
        if num_replicas is None:
            num_replicas = get_world_size()
        if rank is None:
            rank = get_rank()
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, got {repetitions}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.repetitions = repetitions
        self.epoch = 0
        self.num_samples = int(math.ceil(len(dataset) * repetitions / num_replicas))
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = int(math.floor(len(dataset) // 256 * 256 / num_replicas))
        if self.num_selected_samples == 0:
            self.num_selected_samples = int(math.ceil(len(dataset) / num_replicas))

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        indices = order.repeat_interleave(self.repetitions).tolist()
        indices += indices[: self.total_size - len(indices)]  # pad so every rank gets num_samples
        indices = indices[self.rank : self.total_size : self.num_replicas]
        return iter(indices[: self.num_selected_samples])

    def __len__(self):
        return self.num_selected_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


class ShardSampler(torch.utils.data.Sampler):
    """Validation indices ``rank::world_size``, in order and without padding: each image is
    counted exactly once across ranks (DistributedSampler would repeat some to even out)."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()
        self.length = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.length, self.num_replicas))


class MixupCutmixCollate:
    """``default_collate`` then MixUp or CutMix (one picked at random per batch): targets become
    soft (B, num_classes) floats. A class, not a lambda, so spawn-started workers can pickle it."""

    def __init__(self, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("MixupCutmixCollate needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.transform = v2.RandomChoice(choices)

    def __call__(self, batch):
        return self.transform(*default_collate(batch))


def build_loaders(train_dataset, val_dataset, num_classes, *, batch_size, workers=0, seed=0, distributed=False,
                  ra_sampler=False, ra_reps=3, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Return ``(train_loader, val_loader, train_sampler)``: ``batch_size`` images per process,
    ``workers`` loader processes each, the repeated-augmentation sampler (``ra_reps`` copies of an
    image) with ``ra_sampler``, MixUp/CutMix with either alpha above 0.

    Every train sampler has ``set_epoch`` and an order that is a pure function of
    ``(seed, epoch)`` (a one-replica DistributedSampler when not distributed), so a
    resumed run sees the same epochs. The train loader draws each sample's augmentation and
    each batch's MixUp/CutMix from seeds of (seed, epoch, rank, position) (``seeds.py``): its
    ``sampler`` is the :class:`SeededSampler` around ``train_sampler`` (``set_epoch`` it, and its
    ``start`` resumes mid-epoch). Loader workers outlive a SIGTERM (``signals.worker_init``).
    """
    if ra_sampler:
        train_sampler = RASampler(train_dataset, shuffle=True, seed=seed, repetitions=ra_reps)
    elif distributed:
        train_sampler = DistributedSampler(train_dataset, shuffle=True, seed=seed)
    else:
        train_sampler = DistributedSampler(train_dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    val_sampler = ShardSampler(val_dataset) if distributed else SequentialSampler(val_dataset)

    collate_fn = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        collate_fn = MixupCutmixCollate(num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)

    pin_memory = torch.cuda.is_available()
    rank = getattr(train_sampler, "rank", 0)
    train_loader = DataLoader(
        SeededDataset(train_dataset),
        batch_size=batch_size,
        sampler=SeededSampler(train_sampler, seed=seed, rank=rank),
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=SeededCollate(collate_fn),
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed),  # worker seeds: not from the trainer's RNG
    )
    val_loader = DataLoader(
        val_dataset,
        batch_size=batch_size,
        sampler=val_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed),
    )
    return train_loader, val_loader, train_sampler
