"""Per-sample seeds: an epoch's batches are a pure function of (seed, epoch, rank, position).

Each sample's augmentation draws from its own seed, and each batch's MixUp/CutMix from one,
instead of from a worker's running RNG stream. A resumed run that starts ``position`` samples
into the epoch therefore gets the remaining batches exactly as the uninterrupted run got them,
whatever ``--workers`` is, and the trainer's own RNG (weights, dropout, multi-view) is untouched.
"""
import hashlib

import torch
from torch.utils.data.dataloader import default_collate


def derive(*parts):
    """A 63-bit seed from any tuple of ints and strings (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` of ``sampler``'s epoch, from position ``start`` on.

    ``set_epoch`` is passed on; ``start`` (samples to leave out) is how a mid-epoch resume
    skips what was already trained, and the seeds of the rest do not move.
    """

    def __init__(self, sampler, seed=0, rank=0):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, derive(self.seed, self.epoch, self.rank, position)

    def __len__(self):
        return max(len(self.sampler) - self.start, 0)


class SeededDataset(torch.utils.data.Dataset):
    """``dataset[index]`` with torch's RNG seeded by the sample's seed; returns ``(*item, seed)``.

    The caller's RNG state is restored afterwards, so without workers the trainer's stream is
    the same as with them.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU's only: a GPU stream is the trainer's
            return (*self.dataset[index], seed)


class SeededCollate:
    """``collate_fn`` (``default_collate`` if None) under a seed drawn from the batch's first sample."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        seed = batch[0][-1]
        samples = [item[:-1] for item in batch]
        if self.collate_fn is None:
            return default_collate(samples)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive(seed, "collate"))
            return self.collate_fn(samples)
