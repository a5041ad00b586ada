"""A checkpoint written by an earlier version resumes: the one of main at 5a2623e, before the
checkpoint's layout got its one owner (``cakd/train/checkpoints.py``). That tree, taken from the
repository's history, trains two epochs of the cakd recipe (projectors, discriminator and its
optimizer, EMA, RNG states: every key); this tree resumes its epoch-0 file and must end where
the old run ended, and export its student unchanged."""
import importlib.util
import io
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from cakd.train import main
from test_train import ROOT, assert_same_state

OLD = "5a2623e"  # main before issue 17


def old_tree(folder):
    """``cakd/`` and ``configs/`` of commit :data:`OLD`, extracted into ``folder``."""
    result = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", OLD, "cakd", "configs"], capture_output=True)
    if result.returncode != 0:
        pytest.fail(f"this test reads commit {OLD} from the repository's history, and git could not "
                    f"({result.stderr.decode(errors='replace').strip() or 'no git'}): run it in a git clone with full history")
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder


def flags(root, out):
    """Two epochs of one step each, tiny: synthetic 64 px images, resnet18, a random ViT-B/16."""
    return ["--config", os.path.join(root, "configs", "cakd.yaml"), "--device", "cpu", "--dataset", "synthetic",
            "--synthetic-size", "8", "--num-classes", "4", "--output-dir", out, "--model", "resnet18",
            "--teacher-weights", "none", "--train-crop-size", "64", "--val-resize-size", "64", "--val-crop-size", "64",
            "--batch-size", "2", "--workers", "0", "--epochs", "2", "--iters-per-epoch", "1", "--checkpoint-freq", "1",
            "--lr", "0.01", "--model-ema-steps", "1", "--lr-warmup-epochs", "0", "--lambda-start", "-1", "--lambda-span", "1"]


def test_a_checkpoint_of_main_before_issue_17_resumes_exactly(tmp_path, capsys):
    old = old_tree(str(tmp_path / "old"))
    old_out, new_out = str(tmp_path / "old_run"), str(tmp_path / "new_run")
    run_old = ("import sys, cakd, cakd.train; assert cakd.__file__.startswith(sys.argv[1]), cakd.__file__; "
               "sys.exit(cakd.train.main(sys.argv[2:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": old}
    result = subprocess.run([sys.executable, "-c", run_old, old, *flags(old, old_out)], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    saved = torch.load(os.path.join(old_out, "model_0.pth"), weights_only=True)
    assert saved["discriminator"] and saved["projectors"] and saved["disc_optimizer"] and saved["model_ema"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the old run's OMP_NUM_THREADS=1: the same sums in the same order
    try:
        assert main(flags(ROOT, new_out) + ["--resume", os.path.join(old_out, "model_0.pth")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"resumed from {old_out}/model_0.pth: epoch 1, step 0" in capsys.readouterr().out

    uninterrupted = torch.load(os.path.join(old_out, "model_1.pth"), weights_only=True)
    resumed = torch.load(os.path.join(new_out, "checkpoint.pth"), weights_only=True)
    assert resumed["epoch"] == 1 and any(not torch.equal(saved["model"][k], resumed["model"][k]) for k in saved["model"])
    assert_same_state(uninterrupted, resumed, skip={".args"})  # every other entry: the resume was exact
    changed = {k: (v, resumed["args"].get(k)) for k, v in uninterrupted["args"].items() if v != resumed["args"].get(k)}
    assert set(changed) == {"output_dir"}, changed  # the flags this tree added, if any, aside

    exported = tmp_path / "student.pth"  # the scripts read the old file too: its student, unchanged
    spec = importlib.util.spec_from_file_location("scripts_export", os.path.join(ROOT, "scripts", "export.py"))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    assert export.main(["--checkpoint", os.path.join(old_out, "model_0.pth"), "--output", str(exported)]) == 0
    assert_same_state(torch.load(exported, weights_only=True), dict(saved["model"]))
