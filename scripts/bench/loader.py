"""Data loader throughput: decoded and augmented images per second (per worker) with the cakd
training preset, on ``--data-path`` or on generated JPEGs."""
import os
import tempfile
import time

import torch

from cakd.train.data import ClassificationPresetTrain, ImageFolder
from make_image_folder import make_image_folder  # scripts/, beside benchmark.py


def loader_throughput(dataset, workers, batch_size, num_batches):
    """Images per second of a fresh DataLoader over ``num_batches`` batches after one warm-up
    batch (which pays for worker start-up). Indices wrap around a dataset that is too short."""
    indices = [i % len(dataset) for i in range((num_batches + 1) * batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    seconds = time.perf_counter() - start
    del batches  # shuts the workers down
    images_per_s = num_batches * batch_size / seconds if seconds > 0 else float("inf")
    return {"images_per_s": images_per_s, "images_per_s_per_worker": images_per_s / max(workers, 1), "workers": workers,
            "batch_size": batch_size, "seconds": seconds}


def measure_loader(args):
    """Decoded and augmented images per second (per worker) with the cakd training preset."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_path or make_image_folder(tmp, num_classes=4, train_per_class=32, val_per_class=1, size=400)
        preset = ClassificationPresetTrain(
            crop_size=args.image_size, auto_augment_policy="ta_wide", random_erase_prob=0.1
        )
        dataset = ImageFolder(os.path.join(root, "train"), transform=preset)
        for workers in args.loader_workers:
            row = loader_throughput(dataset, workers, args.batch_size, args.loader_batches)
            rows.append(row)
    return rows
