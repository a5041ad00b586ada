"""Recipes seen to learn, through the real trainer: a teacher that knows the classes, a small
student, images that can be told apart (a colour per class), a few dozen steps.

A random torchvision ViT's head is zero-initialised (every logit target 0), so the teacher is a
ViT-B/16 trained at 64 px on the same images by the project's own baseline recipe (it reaches
100% within its first epoch). This catches what step-level tests cannot: a wrong sign, a
detached target, a frozen projector, a term that swamps the labels or diverges.
"""
import json
import os

import pytest

from cakd.train import main as train_main
from make_image_folder import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--device", "cpu", "--train-crop-size", "64", "--val-resize-size", "64", "--val-crop-size", "64",
         "--batch-size", "8", "--workers", "0", "--lr", "0.01", "--print-freq", "9", "--checkpoint-freq", "100"]


def epochs_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """3 classes x 24 training images (9 steps of 8 a epoch), 8 validation images a class, and
    the teacher: ViT-B/16 trained 2 epochs with configs/baseline.yaml."""
    root = tmp_path_factory.mktemp("learning")
    data = make_image_folder(str(root / "data"), num_classes=3, train_per_class=24, val_per_class=8, size=80)
    teacher = str(root / "teacher")
    flags = ["--config", os.path.join(ROOT, "configs", "baseline.yaml"), "--model", "vit_b_16", "--data-path", data,
             "--output-dir", teacher, "--epochs", "2", *SMALL]
    assert train_main(flags) == 0
    assert epochs_of(teacher)[-1]["acc1"] == 100.0
    return data, os.path.join(teacher, "checkpoint.pth"), root


CONFIGS = os.path.join(ROOT, "configs")
PAPER_SETUP = ["--config", os.path.join(CONFIGS, "paper_setup.yaml")]
# recipe: (its flags, {distillation term: the most its last epoch's mean may be of its first's}). Each
# recipe on the paper's set-up (no warmup, no MixUp, no repeated augmentation, no EMA), the released
# losses as they are (logits: logit MSE; cakd: its projectors, PatchGAN, logit MSE in "gl") but the
# released lambda ramp, 0 for 25 epochs, at its maximum 0.2 from the start
RECIPES = {
    "baseline": ([*PAPER_SETUP, "--recipe", "baseline"], {}),
    "logits": ([*PAPER_SETUP, "--recipe", "logits"], {"logits": 0.3}),
    "kd": (["--config", os.path.join(CONFIGS, "kd.yaml")], {"kd": 0.6}),
    "rkd": (["--config", os.path.join(CONFIGS, "rkd.yaml")], {"rkd": 0.5}),
    "irg": (["--config", os.path.join(CONFIGS, "irg.yaml")], {"irg": 0.85}),
    "cakd": ([*PAPER_SETUP, "--recipe", "cakd", "--lambda-form", "constant", "--lambda-constant", "0.2"], {"pca": 0.6, "gl": 0.7}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_learns(setting, recipe):
    """Each recipe with a resnet18 student, 36 steps at lr 0.01: training top-1 on the images far
    above chance (33%), each distillation term falling (last epoch's mean over the first's);
    validation top-1 printed, not asserted (pytest -s): 24 images, it moves in steps of a class
    (33.3, 66.7, 100) and reached 100 in the last epoch for all but irg (66.7) when measured."""
    data, teacher, root = setting
    flags, bounds = RECIPES[recipe]
    out = str(root / recipe)
    teacher_flags = [] if recipe == "baseline" else ["--teacher-weights", teacher]
    assert train_main([*flags, "--model", "resnet18", "--data-path", data, "--output-dir", out, *teacher_flags,
                       "--epochs", "4", *SMALL]) == 0
    epochs = epochs_of(out)
    first, last = epochs[0], epochs[-1]
    ratios = {term: last[f"train_loss_{term}"] / first[f"train_loss_{term}"] for term in ["cls", *bounds]}
    print(f"{recipe}: train top-1 per epoch", [round(e["train_acc1"], 1) for e in epochs], "val top-1",
          [round(e["acc1"], 1) for e in epochs], "last / first epoch:", {k: round(v, 3) for k, v in ratios.items()})
    assert max(e["train_acc1"] for e in epochs[1:]) >= 70 and last["train_acc1"] >= 60
    assert all(ratios[term] < bound for term, bound in bounds.items()), ratios


def test_the_paper_recipe_learns(setting):
    """configs/cakd_paper.yaml (KD, both projectors, multi-view generator, discriminator, no
    clipping) with a resnet18 student, 36 steps at lr 0.01: top-1 far above chance (33%),
    its distillation terms falling. Before the remedy of docs/FIDELITY.md it stayed at chance
    (clipped) or diverged within 7 steps (unclipped)."""
    data, teacher, root = setting
    out = str(root / "cakd_paper")
    flags = ["--config", os.path.join(ROOT, "configs", "cakd_paper.yaml"), "--model", "resnet18", "--data-path", data,
             "--output-dir", out, "--teacher-weights", teacher, "--epochs", "4", *SMALL]
    assert train_main(flags) == 0
    epochs = epochs_of(out)
    first, last = epochs[0], epochs[-1]
    ratios = {term: last[f"train_loss_{term}"] / first[f"train_loss_{term}"] for term in ("cls", "kd", "pca", "gl")}
    print("cakd_paper: train top-1 per epoch", [round(e["train_acc1"], 1) for e in epochs],
          "val top-1", [round(e["acc1"], 1) for e in epochs], "last / first epoch:", {k: round(v, 3) for k, v in ratios.items()})
    assert last["train_acc1"] >= 80 and max(e["acc1"] for e in epochs) >= 80
    assert ratios["kd"] < 0.5 and ratios["gl"] < 0.9 and ratios["pca"] < 1.0
