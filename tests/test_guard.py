"""The guard: no code runs from torch's hub cache, divergence is told from a converged run's
noise, and a stop request is acted on within a few steps whatever ``--print-freq`` is."""
import hashlib
import json
import math
import os
import pickle
import re
import signal

import pytest
import torch

import cakd
from cakd.weights import load_torchvision_weights
from test_run_folder import Payload, hostile_file
from test_train import ROOT, run_main


def hostile_cache_file(path, marker):
    """A crafted pickle (tests/test_run_folder.py's) where torch's hub cache keeps a download."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return hostile_file(path, marker)


def test_a_crafted_file_in_the_hub_cache_is_refused_by_its_hash(monkeypatch, tmp_path):
    """The very path the offline error names: a file there that is not torchvision's is refused
    before it is unpickled, and its payload never runs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "ran"
    cached = hostile_cache_file(str(tmp_path / "hub" / "checkpoints" / "vit_b_16-c867db91.pth"), marker)
    with pytest.raises(ValueError, match=rf"{cached} is not the vit_b_16 IMAGENET1K_V1 file: its SHA-256 does not start with c867db91"):
        cakd.build_teacher("vit_b_16", weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_a_cached_file_whose_hash_matches_is_still_read_weights_only(monkeypatch, tmp_path):
    """Even a file whose SHA-256 matches its name (a hash prefix is 32 bits) is read with
    ``weights_only=True``: its payload is refused in one line, not run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "ran"
    staged = hostile_cache_file(str(tmp_path / "staged.pth"), marker)
    digest = hashlib.sha256(open(staged, "rb").read()).hexdigest()
    name = f"vit_b_16-{digest[:8]}.pth"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.replace(staged, tmp_path / "hub" / "checkpoints" / name)
    with pytest.raises(ValueError, match=r"cannot be read \(it holds objects other than tensors"):
        load_torchvision_weights("vit_b_16", "IMAGENET1K_V1", f"https://download.pytorch.org/models/{name}")
    assert not marker.exists()


def test_a_cached_file_with_the_right_hash_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = {"fc.weight": torch.arange(6.0).reshape(2, 3)}
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(open(staged, "rb").read()).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.replace(staged, tmp_path / "hub" / "checkpoints" / name)
    loaded = load_torchvision_weights("resnet18", "IMAGENET1K_V1", f"https://download.pytorch.org/models/{name}")
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])


# ---- divergence: measured against a scale a converged run cannot fall below -----------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from make_image_folder import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=6, val_per_class=2, size=64)


def flags(data, out, epochs, recipe="baseline", print_freq=1, iters=3):
    return ["--config", os.path.join(ROOT, "configs", f"{recipe}.yaml"), "--device", "cpu", "--data-path", data,
            "--output-dir", out, "--model", "resnet18", "--train-crop-size", "64", "--val-resize-size", "64",
            "--val-crop-size", "64", "--batch-size", "2", "--workers", "0", "--epochs", str(epochs), "--iters-per-epoch",
            str(iters), "--print-freq", str(print_freq), "--lr", "0.01", "--lr-warmup-epochs", "0"]


def scripted_losses(monkeypatch, script):
    """Replace each step's logged total loss by ``script(epoch, step, real)``: the step itself
    trains as usual, only what the loop measures changes."""
    import cakd.train.engine as engine

    real_step, counter = engine.training_step, {}

    def step(distiller, images, targets, epoch, *args, **kwargs):
        losses = real_step(distiller, images, targets, epoch, *args, **kwargs)
        i = counter[epoch] = counter.get(epoch, -1) + 1
        losses["total"] = torch.tensor(script(epoch, i, losses["total"].item()))
        return losses

    monkeypatch.setattr(engine, "training_step", step)


def test_a_converged_runs_noise_is_not_divergence(data, tmp_path, capsys, monkeypatch):
    """The issue's pattern: an epoch of a run that fits its data starts at a loss of 1e-5 and has
    one ordinary batch of 3.26 (the old check read 1e5 times growth). Every epoch is saved."""
    scripted_losses(monkeypatch, lambda epoch, i, real: real if epoch == 0 else (1e-5, 3.26, 1e-4)[i])
    out = str(tmp_path / "run")
    code, err = run_main(flags(data, out, epochs=3), capsys)
    assert code == 0, err
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["epoch"] == 2


def test_an_injected_growth_stops_with_the_good_checkpoint_kept(data, tmp_path, capsys, monkeypatch):
    """Epoch 1's loss a million times epoch 0's: refused, epoch 0's checkpoint kept byte for byte,
    and the line says that a resume would only repeat it, and what to change."""
    scripted_losses(monkeypatch, lambda epoch, i, real: real * (1e6 if epoch == 1 else 1))
    out = str(tmp_path / "run")
    code, err = run_main(flags(data, out, epochs=1), capsys)
    assert code == 0, err
    saved = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    code, err = run_main(flags(data, out, epochs=2) + ["--resume", "auto"], capsys)
    assert code == 1 and len(err) == 1, err
    found = re.match(r"error: the training loss diverged: the epoch's mean (\S+) is (\S+) times the run's loss scale "
                     r"ln\(3\) = 1.099 \(--max-loss-growth 1000\) in epoch 1: not saved, ", err[0])
    mean, growth = (float(x) for x in found.groups())
    assert growth > 1000 and mean == pytest.approx(growth * math.log(3), rel=1e-2)  # as printed: 4 and 3 digits
    assert f"in epoch 1: not saved, {out}/checkpoint.pth (" not in err[0]  # the file from before this run is kept
    assert ("--resume auto would replay the same steps and stop here again: start a new run in another --output-dir from "
            f"its weights (--weights {out}/checkpoint.pth) with a lower --lr") in err[0]
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == saved and not os.path.exists(os.path.join(out, "model_1.pth"))


# ---- a stop request is acted on within a few seconds of steps, whatever --print-freq is -----------------
def test_print_freq_1000_still_stops_at_the_next_step(data, tmp_path, capsys, monkeypatch):
    """A SIGTERM during step 2 of an 8-step epoch with --print-freq 1000: the run saves step 3."""
    import cakd.train.engine as engine

    real_step, count = engine.training_step, []

    def step(*args, **kwargs):
        count.append(1)
        if len(count) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "training_step", step)
    out = str(tmp_path / "run")
    code, err = run_main(flags(data, out, epochs=1, print_freq=1000, iters=8), capsys)
    assert code == 0, err
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 3)


def _agree(rank, store, stop_at, results):
    from torch import distributed as dist

    from cakd.train.signals import StopCheck

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    class Stop:
        requested = False

    stop = Stop()
    check = StopCheck(stop)
    for step in range(100):
        stop.requested = rank == 1 and step >= stop_at
        if check():
            break
    results[rank] = step
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_at_the_next_step(tmp_path):
    """Two processes, rank 1 alone asked to stop in step 10: both stop after step 10."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agree, args=(str(tmp_path / "store"), 10, results), nprocs=2)
    assert results[0] == results[1] == 10


def test_attention_maps_of_a_diverged_model_are_drawn_grey():
    """--lr 1e6 with the cakd recipe gave non-finite maps and an IndexError from the colour map,
    before the checkpoint check could say what diverged in one line."""
    from cakd.train.figures import map_grid

    teacher = torch.rand(1, 4, 4)
    student = torch.full((1, 4, 4), float("nan"))
    picture = map_grid(teacher, student, cell=32)
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3
    student_cell = picture[:, 16:48, 38:70]  # title 16 px; student column after the teacher's 32 px and a 6 px gap
    assert (student_cell == 128).all()


def test_a_stop_during_evaluation_saves_at_once_and_the_resume_evaluates_first(data, tmp_path, capsys, monkeypatch):
    """A SIGTERM during the first of 3 evaluation batches: the epoch is saved without waiting for
    the rest, with no metrics.jsonl line; the resume evaluates it, writes its line and trains
    on, ending equal to an uninterrupted run in every checkpoint entry and every metrics line."""
    from cakd.train import logging as train_logging
    from test_train import assert_same_state

    whole = str(tmp_path / "whole")
    assert run_main(flags(data, whole, epochs=2), capsys)[0] == 0

    real_update, calls = train_logging.Accuracy.update, []

    def update(self, logits, targets):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(self, logits, targets)

    monkeypatch.setattr(train_logging.Accuracy, "update", update)
    out = str(tmp_path / "cut")
    code, _ = run_main(flags(data, out, epochs=2), capsys)
    assert code == 0 and len(calls) == 1  # one batch of three evaluated
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] is None and checkpoint["unevaluated"]["loss"] > 0
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))

    monkeypatch.setattr(train_logging.Accuracy, "update", real_update)
    code, _ = run_main(flags(data, out, epochs=2) + ["--resume", "auto"], capsys)
    assert code == 0
    assert_same_state(torch.load(os.path.join(whole, "checkpoint.pth"), weights_only=True),
                      torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True), skip={".args.output_dir"})
    assert open(os.path.join(out, "metrics.jsonl")).read() == open(os.path.join(whole, "metrics.jsonl")).read()


# ---- nothing lost to a full disk, nothing unreadable that can be read --------------------------------------
def tmp_files(folder):
    return [name for name in os.listdir(folder) if name.startswith(".tmp-")]


def test_a_full_disk_at_the_metrics_line_loses_nothing(data, tmp_path, capsys, monkeypatch):
    """The line is written to a temporary file before the checkpoints: no space for it is one line,
    no checkpoint and no line for the epoch, nothing left over; the rerun writes both."""
    import errno

    import cakd.train.saving as saving

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(saving, "stage_text", no_space)
    out = str(tmp_path / "run")
    code, err = run_main(flags(data, out, epochs=1), capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: could not write {out}/metrics.jsonl ([Errno 28] No space")
    assert not {"checkpoint.pth", "model_0.pth", "metrics.jsonl"} & set(os.listdir(out)) and not tmp_files(out)
    monkeypatch.undo()
    assert run_main(flags(data, out, epochs=1) + ["--resume", "auto"], capsys)[0] == 0
    assert {"checkpoint.pth", "metrics.jsonl"} <= set(os.listdir(out))


def test_a_cut_off_last_metrics_line_does_not_stop_a_resume(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(flags(data, out, epochs=1), capsys)[0] == 0
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 1, "acc1": 33.')  # an earlier version's append, cut by a full disk
    code, _ = run_main(flags(data, out, epochs=2) + ["--resume", "auto"], capsys)
    assert code == 0
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_torch_writers_full_disk_error_says_so(tmp_path, monkeypatch):
    """torch.save reports a failed write as ``[enforce fail at inline_container.cc:...]``."""
    import errno

    import cakd.weights

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(cakd.weights.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=r"the write stopped part-way, \d+ MiB free on that disk \(a full disk\?\)"):
        cakd.weights.save_atomic({"w": torch.zeros(10000)}, str(tmp_path / "checkpoint.pth"))
    assert os.listdir(tmp_path) == []


def test_a_raw_pickle_resume_file_gets_the_checkpoint_message(data, tmp_path, capsys):
    """torch.save's legacy format cannot be memory-mapped: read whole, it is judged as any file."""
    legacy = str(tmp_path / "legacy.pth")
    torch.save({"model": {}}, legacy, _use_new_zipfile_serialization=False)
    code, err = run_main(flags(data, str(tmp_path / "run"), epochs=1) + ["--resume", legacy], capsys)
    assert code == 1 and err == [f"error: {legacy} is not a cakd training checkpoint (no optimizer, lr_scheduler, epoch, args)"]
    marker = tmp_path / "ran"
    with open(legacy, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f, protocol=2)
    code, err = run_main(flags(data, str(tmp_path / "run"), epochs=1) + ["--resume", legacy], capsys)
    assert code == 1 and len(err) == 1 and "cannot be read (it holds objects other than tensors" in err[0]
    assert "mmap" not in err[0] and not marker.exists()


@pytest.mark.parametrize("config, metrics, message", [
    ("- a\n- list\n", '{"epoch": 0, "acc1": 50.0}\n', "config.yaml holds a YAML list, not the mapping of flags a run writes"),
    ("recipe: cakd\n", '{"epoch": 0, "acc1": "fifty"}\n', "metrics.jsonl: epoch 0's acc1 is 'fifty', not a number"),
    ("recipe: cakd\n", '[1, 2]\n{"epoch": 1}\n', "metrics.jsonl line 1 is not a metrics record (not an object with an integer epoch)"),
])
def test_summarize_bad_run_files_are_one_line(tmp_path, capsys, config, metrics, message):
    import summarize

    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "metrics.jsonl").write_text(metrics)
    assert summarize.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ---- the data folder: the cache confined to it, links, 16-bit and huge images ----------------------------
def test_a_crafted_dataset_cache_cannot_leave_its_folder_or_its_classes(data, tmp_path):
    """A cache entry with a matching fingerprint but a path outside the folder, a path into
    another class's folder, or a label out of range is not used: the folder is listed again."""
    from cakd.train.data import write_listing_cache
    from cakd.train.data.datasets import CACHE_FILE, _image_folder

    split = os.path.join(data, "train")
    listed = _image_folder(split, None, cache_dir=str(tmp_path))
    write_listing_cache(listed)
    listed = listed.samples
    cache = json.load(open(tmp_path / CACHE_FILE))
    entry = cache[os.path.abspath(split)]
    good = [list(s) for s in entry["samples"]]
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"not for training")
    for path, label in [(str(outside), 0), ("class_0/../../outside.jpg", 0), ("class_1/" + good[0][0].split("/")[1], 0),
                        (good[0][0], 7), (good[0][0], -1)]:
        entry["samples"] = [[path, label]] + good[1:]
        (tmp_path / CACHE_FILE).write_text(json.dumps(cache))
        assert _image_folder(split, None, cache_dir=str(tmp_path)).samples == listed, (path, label)
    entry["samples"] = good  # the untouched entry is used as it is
    (tmp_path / CACHE_FILE).write_text(json.dumps(cache))
    assert _image_folder(split, None, cache_dir=str(tmp_path)).listing is not None


def test_image_links_that_lead_to_each_other_are_one_error(tmp_path):
    from cakd.train.data import DataError, list_images

    (tmp_path / "train" / "a").mkdir(parents=True)
    os.symlink("b.jpg", tmp_path / "train" / "a" / "a.jpg")
    os.symlink("a.jpg", tmp_path / "train" / "a" / "b.jpg")
    with pytest.raises(DataError, match=r"/train/a/[ab].jpg cannot be followed \(Too many levels of symbolic links\): a loop of links"):
        list_images(str(tmp_path / "train"), {"a": 0})


def test_a_16_bit_png_is_scaled_not_clipped_white(tmp_path):
    import numpy as np
    from PIL import Image

    from cakd.train.data import load_image

    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    rgb = np.asarray(load_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb[..., 0].astype(float) - grey / 257.0).max() <= 0.5


def test_an_image_above_pils_limit_is_one_line_before_training(data, tmp_path, capsys, monkeypatch):
    """Above twice PIL's Image.MAX_IMAGE_PIXELS PIL refuses to decode (a decompression-bomb guard):
    the validation image check names the file before the first epoch. The limit is lowered here
    to make 64x64 images count as such."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, err = run_main(flags(data, str(tmp_path / "run"), epochs=1), capsys)
    assert code == 1 and len(err) == 1 and f"error: image {data}/val/class_0/" in err[0]
    assert "is too large to decode safely (Image size (4096 pixels) exceeds limit of 2000 pixels" in err[0]
    assert err[0].endswith("shrink it or remove it")
