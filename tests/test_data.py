"""Data pipeline: presets, samplers, MixUp/CutMix collate, dataset building and its errors."""
import argparse
import collections
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torchvision.datasets import FakeData
from torchvision.transforms import v2

from cakd.students import IMAGENET_MEAN
from cakd.train.data import (
    ClassificationPresetEval,
    ClassificationPresetTrain,
    DataError,
    MixupCutmixCollate,
    RASampler,
    build_datasets,
    build_loaders,
    write_listing_cache,
)
from cakd.train.run import dataset_options, loader_options
from make_image_folder import make_image_folder


def make_args(**overrides):
    args = dict(
        dataset="imagefolder",
        data_path=None,
        batch_size=4,
        workers=0,
        interpolation="bilinear",
        train_crop_size=64,
        val_crop_size=64,
        val_resize_size=72,
        auto_augment=None,
        ra_magnitude=9,
        augmix_severity=3,
        random_erase=0.0,
        cache_dataset=False,
        download=False,
        output_dir=None,
        synthetic_size=64,
        num_classes=None,
        ra_sampler=False,
        ra_reps=4,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        seed=0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def noise_image(width=100, height=80, seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy, kind",
    [
        (None, None),
        ("ta_wide", v2.TrivialAugmentWide),
        ("ra", v2.RandAugment),
        ("augmix", v2.AugMix),
        ("imagenet", v2.AutoAugment),
    ],
)
def test_train_preset_shapes_for_each_policy(policy, kind):
    torch.manual_seed(0)
    preset = ClassificationPresetTrain(crop_size=64, auto_augment_policy=policy)
    kinds = [type(t) for t in preset.transforms.transforms]
    assert kinds[0] is v2.RandomResizedCrop and kinds[-1] is v2.Normalize
    if kind is not None:
        assert kind in kinds
    out = preset(noise_image())
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 64, 64)


def test_train_preset_random_erasing():
    torch.manual_seed(0)
    preset = ClassificationPresetTrain(crop_size=48, random_erase_prob=1.0)
    assert type(preset.transforms.transforms[-1]) is v2.RandomErasing
    out = preset(noise_image())
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert (out == 0).all(dim=0).sum() > 0  # the erased box is zeros in every channel
    assert v2.RandomErasing not in [type(t) for t in ClassificationPresetTrain(48).transforms.transforms]


def test_eval_preset_resizes_short_side_then_center_crops():
    preset = ClassificationPresetEval(crop_size=64, resize_size=72)
    resize, crop = preset.transforms.transforms[:2]
    assert resize(noise_image(100, 80)).size == (90, 72)  # PIL size is (width, height)
    out = preset(noise_image(100, 80))
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 64, 64)
    mean_colour = Image.new("RGB", (80, 80), tuple(round(255 * m) for m in IMAGENET_MEAN))
    assert preset(mean_colour).abs().max() < 0.01  # scaled to [0, 1], then normalized


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------
def test_ra_sampler_repeats_each_index_across_ranks():
    dataset = Indices(512)
    ranks = [list(RASampler(dataset, num_replicas=2, rank=r, seed=0, repetitions=4)) for r in range(2)]
    assert [len(r) for r in ranks] == [256, 256]
    for indices in ranks:
        assert set(collections.Counter(indices).values()) == {2}  # 2 of each index's 4 copies per rank
    assert set(ranks[0]) == set(ranks[1])
    union = collections.Counter(ranks[0] + ranks[1])
    assert len(union) == 128 and set(union.values()) == {4}


@pytest.mark.parametrize("size, replicas", [(1000, 3), (300, 8), (257, 2), (5, 3)])
def test_ra_sampler_same_count_on_every_rank(size, replicas):
    samplers = [RASampler(Indices(size), num_replicas=replicas, rank=r, repetitions=4) for r in range(replicas)]
    counts = {len(list(s)) for s in samplers}
    assert counts == {len(samplers[0])} and len(samplers[0]) > 0
    assert samplers[0].num_samples == -(-size * 4 // replicas)


def test_ra_sampler_epoch_and_seed():
    def order(seed, epoch):
        sampler = RASampler(Indices(512), num_replicas=1, rank=0, seed=seed, repetitions=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert len(order(0, 1)) == 512


def test_ra_sampler_tiny_dataset_fallback():
    single = list(RASampler(Indices(10), num_replicas=1, rank=0, repetitions=4))
    assert len(single) == 10 and set(collections.Counter(single).values()) <= {4, 2}
    per_rank = [list(RASampler(Indices(10), num_replicas=3, rank=r, repetitions=4)) for r in range(3)]
    assert [len(r) for r in per_rank] == [4, 4, 4]


@pytest.mark.parametrize("ra_sampler", [False, True])
def test_train_order_is_a_function_of_seed_and_epoch(ra_sampler):
    dataset = FakeData(40, (3, 8, 8), 4)
    args = make_args(ra_sampler=ra_sampler)

    def order(epoch, seed=0, touch_rng=False):
        if touch_rng:
            torch.manual_seed(123)
            torch.rand(7)
        _, _, sampler = build_loaders(dataset, dataset, 4, **loader_options(make_args(ra_sampler=ra_sampler, seed=seed)))
        sampler.set_epoch(epoch)
        return list(sampler)

    _, val_loader, sampler = build_loaders(dataset, dataset, 4, **loader_options(args))
    assert isinstance(sampler, RASampler if ra_sampler else DistributedSampler)
    assert isinstance(val_loader.sampler, SequentialSampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == order(2) == order(2, touch_rng=True)
    assert order(2) != order(3) and order(2) != order(2, seed=1)
    if not ra_sampler:
        assert sorted(order(5)) == list(range(40))


# ----------------------------------------------------------------------------------------------
# MixUp / CutMix and synthetic data
# ----------------------------------------------------------------------------------------------
def test_mixup_cutmix_collate_soft_targets_in_a_worker():
    collate = MixupCutmixCollate(5, mixup_alpha=0.2, cutmix_alpha=1.0)
    pickle.loads(pickle.dumps(collate))  # spawn-started workers need this
    loader = DataLoader(FakeData(16, (3, 16, 16), 5, transform=v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])), batch_size=8, num_workers=1, collate_fn=collate)
    for images, targets in loader:
        assert images.shape == (8, 3, 16, 16)
        assert targets.shape == (8, 5) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        MixupCutmixCollate(5)


def test_synthetic_dataset_is_deterministic_and_goes_through_the_presets():
    args = make_args(dataset="synthetic", synthetic_size=10, val_crop_size=32)
    a, _, _ = build_datasets(**dataset_options(args))
    b, _, _ = build_datasets(**dataset_options(args))
    torch.manual_seed(0)
    image, label = a[4]
    torch.manual_seed(0)
    assert torch.equal(image, b[4][0]) and label == b[4][1]
    assert image.dtype == torch.float32 and abs(image.mean().item()) < 3  # normalised, as the presets give
    torch.manual_seed(0)
    assert not torch.equal(image, a[5][0])
    train, val, num_classes = build_datasets(**dataset_options(make_args(dataset="synthetic", synthetic_size=10, val_crop_size=32)))
    assert num_classes == 1000 and len(train) == 10 and len(val) == 2
    assert train[0][0].shape == (3, 64, 64) and val[0][0].shape == (3, 32, 32)
    assert build_datasets(**dataset_options(make_args(dataset="synthetic", num_classes=7)))[2] == 7


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def _no_path(root):
    return None, "--data-path"


def _missing(root):
    return os.path.join(root, "nowhere"), os.path.join(root, "nowhere")


def _no_train(root):
    os.makedirs(os.path.join(root, "val", "a"))
    return root, os.path.join(root)


def _no_val(root):
    make_image_folder(root, num_classes=1, train_per_class=1, val_per_class=1, size=8)
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))
    return root, root


def _class_mismatch(root):
    make_image_folder(root, num_classes=2, train_per_class=1, val_per_class=1, size=8)
    os.rename(os.path.join(root, "val", "class_1"), os.path.join(root, "val", "class_9"))
    return root, os.path.join(root, "train")


def _no_class_folders(root):
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "val"))
    return root, os.path.join(root, "train")


def _empty_class(root):
    make_image_folder(root, num_classes=2, train_per_class=1, val_per_class=1, size=8)
    os.remove(os.path.join(root, "val", "class_1", "img_0.JPEG"))
    return root, os.path.join(root, "val")


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (_no_path, "no data path given: pass --data-path"),
        (_missing, "does not exist: pass --data-path"),
        (_no_train, "has no train/ folder: ImageNet-style layout"),
        (_no_val, "has no val/ folder"),
        (_class_mismatch, r"differ \(only in train: class_1; only in val: class_9\)"),
        (_no_class_folders, "has no class folders"),
        (_empty_class, r"class folders with no images \(class_1\)"),
    ],
)
def test_bad_layouts_raise_one_line_data_error(tmp_path, setup, pattern):
    data_path, named = setup(str(tmp_path))
    with pytest.raises(DataError, match=pattern) as info:
        build_datasets(**dataset_options(make_args(data_path=data_path)))
    message = str(info.value)
    assert "\n" not in message and named in message


def test_num_classes_that_disagree_with_the_folders(tmp_path):
    make_image_folder(str(tmp_path), num_classes=2, train_per_class=1, val_per_class=1, size=8)
    with pytest.raises(DataError, match="--num-classes is 5 but .* has 2 class folders"):
        build_datasets(**dataset_options(make_args(data_path=str(tmp_path), num_classes=5)))
    assert build_datasets(**dataset_options(make_args(data_path=str(tmp_path), num_classes=2)))[2] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tmp_path, damage, workers):
    root = make_image_folder(str(tmp_path), num_classes=2, train_per_class=2, val_per_class=1, size=64)
    bad = os.path.join(root, "train", "class_1", "img_0.JPEG")
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(b"this is not a jpeg" * 10 if damage == "garbage" else data[: len(data) // 2])
    train, _, _ = build_datasets(**dataset_options(make_args(data_path=root)))
    batches = iter(DataLoader(train, batch_size=4, num_workers=workers))
    # Plain try/except, not pytest.raises: a failed worker iterator that is only freed by the
    # cyclic garbage collector takes torch 5 s to shut down; this way it is freed at once.
    try:
        for _ in batches:
            pass
    except DataError as error:
        message = str(error)
    else:
        pytest.fail("a corrupt image did not raise DataError")
    del batches
    last = message.splitlines()[-1]
    assert last.startswith(f"cannot read image {bad} (") and last.endswith("): remove or replace the file")
    if workers:
        assert "worker" in message  # torch's wrapper, with the clear line kept last
    else:
        assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# End to end, cache, throughput
# ----------------------------------------------------------------------------------------------
def test_image_folder_end_to_end_with_ra_sampler_and_mixup(tmp_path):
    root = make_image_folder(str(tmp_path), num_classes=3, train_per_class=4, val_per_class=2, size=80)
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["class_0", "class_1", "class_2"]
    args = make_args(
        data_path=root, ra_sampler=True, mixup_alpha=0.2, cutmix_alpha=1.0, auto_augment="ta_wide", random_erase=0.1
    )
    train, val, num_classes = build_datasets(**dataset_options(args))
    assert (len(train), len(val), num_classes) == (12, 6, 3)
    train_loader, val_loader, sampler = build_loaders(train, val, num_classes, distributed=False, **loader_options(args))
    assert isinstance(sampler, RASampler) and len(sampler) == 12 and len(train_loader) == 3
    sampler.set_epoch(1)
    images, targets = next(iter(train_loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert targets.shape == (4, 3) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    images, labels = next(iter(val_loader))
    assert images.shape == (4, 3, 64, 64) and labels.tolist() == [0, 0, 1, 1]


def cached_build(args):
    """build_datasets, then the cache written as the trainer writes it once its checks pass."""
    train, val, num_classes = build_datasets(**dataset_options(args))
    write_listing_cache(train, val)
    return train, val, num_classes


def test_cache_dataset_reuses_the_file_list_with_new_transforms(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=2, val_per_class=1, size=40)
    out = tmp_path / "run"
    out.mkdir()
    cached_build(make_args(data_path=root, cache_dataset=True, output_dir=str(out)))
    cache = json.loads((out / "dataset_cache.json").read_text())  # plain JSON in the run folder
    assert sorted(cache) == [os.path.join(root, "train"), os.path.join(root, "val")]
    assert cache[os.path.join(root, "train")]["classes"] == ["class_0", "class_1"]
    rewritten = dict(cache)  # the listing comes from the cache while the fingerprint holds
    rewritten[os.path.join(root, "train")]["samples"] = rewritten[os.path.join(root, "train")]["samples"][:3]
    (out / "dataset_cache.json").write_text(json.dumps(rewritten))
    train, val, num_classes = cached_build(make_args(data_path=root, cache_dataset=True, output_dir=str(out), train_crop_size=32))
    assert (len(train), len(val), num_classes) == (3, 2, 2)
    assert train[0][0].shape == (3, 32, 32)  # but the transform is today's


def test_cache_dataset_is_rebuilt_when_the_folder_changes(tmp_path):
    """A class added to train/ and val/, or an image added to a class: the fingerprint differs,
    the folder is listed again (the old cache, keyed by the path only, trained 2 classes here)."""
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=2, val_per_class=1, size=40)
    args = make_args(data_path=root, cache_dataset=True, output_dir=str(tmp_path))
    assert cached_build(args)[2] == 2
    for split, count in (("train", 2), ("val", 1)):
        os.makedirs(os.path.join(root, split, "class_2"))
        for i in range(count):
            noise_image(40, 40).save(os.path.join(root, split, "class_2", f"img_{i}.JPEG"))
    train, val, num_classes = cached_build(args)
    assert (len(train), len(val), num_classes) == (6, 3, 3)
    extra = os.path.join(root, "train", "class_0", "img_9.JPEG")
    noise_image(40, 40).save(extra)
    train = cached_build(args)[0]
    assert len(train) == 7 and (extra, 0) in train.samples


def test_cache_dataset_never_unpickles(tmp_path, monkeypatch):
    """A crafted pickle where the old cache lived (~/.torch/vision/datasets/imagefolder/), and one
    in the run folder's cache file: neither runs, the folder is listed as it is."""
    import hashlib

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=2, val_per_class=1, size=40)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    old = tmp_path / "home" / ".torch" / "vision" / "datasets" / "imagefolder"
    old.mkdir(parents=True)
    for split in ("train", "val"):
        digest = hashlib.sha1(os.path.join(root, split).encode()).hexdigest()[:10]
        torch.save(Payload(), old / f"{digest}.pt")
    out = tmp_path / "run"
    out.mkdir()
    torch.save(Payload(), out / "dataset_cache.json")
    train, val, num_classes = cached_build(make_args(data_path=root, cache_dataset=True, output_dir=str(out)))
    assert not marker.exists() and (len(train), len(val), num_classes) == (4, 2, 2)
    assert json.loads((out / "dataset_cache.json").read_text())  # replaced by a listing


def test_links_to_files_are_followed_links_to_folders_refused(tmp_path):
    """class_0/self -> . gave class_0 41 copies of its images, class_0/to1 -> ../class_1 gave it
    class_1's: each is now one line. A link to an image is an image; a class folder that is a link
    is followed, but never to a folder listed already."""
    root = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=2, val_per_class=1, size=40)
    train_dir = os.path.join(root, "train")
    outside = tmp_path / "outside.JPEG"
    noise_image(40, 40).save(outside)
    os.symlink(outside, os.path.join(train_dir, "class_0", "linked.JPEG"))
    train = build_datasets(**dataset_options(make_args(data_path=root)))[0]
    assert len(train) == 5 and (os.path.join(train_dir, "class_0", "linked.JPEG"), 0) in train.samples

    loop = os.path.join(train_dir, "class_0", "self")
    os.symlink(".", loop)
    with pytest.raises(DataError, match=rf"^{loop} is a link to the folder {train_dir}/class_0: links to folders are not followed"):
        build_datasets(**dataset_options(make_args(data_path=root)))
    os.remove(loop)
    os.symlink("../class_1", loop)
    with pytest.raises(DataError, match=rf"^{loop} is a link to the folder {train_dir}/class_1"):
        build_datasets(**dataset_options(make_args(data_path=root)))
    os.remove(loop)
    for split in ("train", "val"):  # class_2 -> class_0: the same images under two labels
        os.symlink("class_0", os.path.join(root, split, "class_2"))
    with pytest.raises(DataError, match=rf"^{train_dir}/class_2 is {train_dir}/class_0, a folder already listed"):
        build_datasets(**dataset_options(make_args(data_path=root)))


def test_shard_sampler_counts_every_validation_image_once():
    from cakd.train.data import ShardSampler

    data = list(range(11))
    shards = [list(ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [4, 4, 3]
