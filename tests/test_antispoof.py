"""Face anti-spoofing (the paper's Table 4): CelebA-Spoof's layout read as published, the EER,
AUC and APCER / BPCER / ACER against a plain recomputation (also across ranks), a student that
learns a generated set through the trainer, bad input in one line, and the Table 4 students
(ResNeXt-26, Inception-v3) in every recipe."""
import json
import os
import socket
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import cakd
from conftest import tiny_vit
from make_celeba_spoof import make_celeba_spoof
from cakd.train import main
from cakd.train.data.celeba_spoof import CelebASpoof, box_path
from cakd.train.spoof_metrics import SpoofScores, antispoof_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def spoof_dir(tmp_path_factory):
    return make_celeba_spoof(str(tmp_path_factory.mktemp("celeba_spoof")))


# ----------------------------------------------------------------------------------------------
# The metrics, recomputed plainly from their definitions
# ----------------------------------------------------------------------------------------------
def plain_metrics(scores, labels):
    """Called a spoof when score >= t. APCER(t): spoofs below t / spoofs; BPCER(t): live at or
    above t / lives; t runs over the scores seen; the EER threshold has the closest APCER and
    BPCER (then the smaller sum, then the lower t); EER = ACER = their mean. AUC: spoof-live
    pairs where the spoof scores higher, a tie counting 1/2."""
    spoof = [s for s, y in zip(scores, labels) if y == 1]
    live = [s for s, y in zip(scores, labels) if y == 0]
    best = None
    for t in sorted(set(scores)):
        apcer = Fraction(sum(s < t for s in spoof), len(spoof))
        bpcer = Fraction(sum(s >= t for s in live), len(live))
        key = (abs(apcer - bpcer), apcer + bpcer, t)
        if best is None or key < best[0]:
            best = (key, apcer, bpcer, t)
    _, apcer, bpcer, t = best
    wins = sum(Fraction(1) if s > l else Fraction(1, 2) if s == l else 0 for s in spoof for l in live)
    return {"eer": 100 * float((apcer + bpcer) / 2), "auc": float(wins / (len(spoof) * len(live))),
            "apcer": 100 * float(apcer), "bpcer": 100 * float(bpcer), "acer": 100 * float((apcer + bpcer) / 2),
            "eer_threshold": t}


def assert_close(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), (key, got[key], want[key])


CASES = {
    "ties": ([0.1, 0.5, 0.5, 0.5, 0.9, 0.2, 0.5, 0.7, 0.3, 0.3], [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]),
    "all equal": ([0.4] * 6, [0, 1, 0, 1, 1, 0]),
    "separated": ([-3.0, -1.0, 0.5, 2.0, 4.0], [0, 0, 1, 1, 1]),
    "inverted": ([3.0, 2.0, -1.0, -2.0], [0, 0, 1, 1]),
    "unbalanced": ([0.2, 0.6, 0.1, 0.8, 0.4, 0.45, 0.9], [0, 1, 0, 0, 0, 0, 1]),
    "equal gaps": ([0.0, 2.0, 4.0], [1, 0, 1]),  # t = 2 and t = 4 both 1/2 apart: the smaller sum wins
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_match_a_plain_recomputation(case):
    scores, labels = CASES[case]
    assert_close(antispoof_metrics(scores, labels), plain_metrics(scores, labels))


def test_metrics_of_known_cases_and_of_random_scores():
    assert antispoof_metrics([0.4] * 4, [0, 1, 0, 1])["eer"] == 50.0
    assert antispoof_metrics([0.4] * 4, [0, 1, 0, 1])["auc"] == 0.5
    assert antispoof_metrics([-1.0, 1.0], [0, 1])["eer"] == 0.0
    assert antispoof_metrics([1.0, 2.0], [0, 0]) == {}  # no spoof: nothing to report
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 8, (30,), generator=g).div(4).tolist()  # many ties
        labels = torch.randint(0, 2, (30,), generator=g).tolist()
        if 0 < sum(labels) < 30:
            assert_close(antispoof_metrics(scores, labels), plain_metrics(scores, labels))


def _gather_worker(rank, port, shares, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    scores = SpoofScores()
    for logits, targets in shares[rank]:
        scores.update(torch.tensor(logits), torch.tensor(targets))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(scores.compute(), f)
    torch.distributed.destroy_process_group()


def test_metrics_gather_every_rank_exactly(tmp_path):
    """Two gloo processes, rank 0's share all live: each reports the metrics of all the images,
    as the plain recomputation on their union."""
    shares = [
        [([[0.0, -1.0], [0.0, 0.5]], [0, 0]), ([[1.0, 0.0]], [0])],
        [([[0.0, 0.25], [0.0, 0.5], [0.0, -2.0]], [1, 1, 0]), ([[0.0, 0.5], [0.0, 3.0]], [0, 1])],
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_gather_worker, args=(port, shares, str(tmp_path)), nprocs=2, start_method="fork")
    scores = [z1 - z0 for share in shares for logits, _ in share for z0, z1 in logits]
    labels = [y for share in shares for _, targets in share for y in targets]
    want = plain_metrics(scores, labels)
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert_close(json.load(f), want)
    one_rank = antispoof_metrics(*zip(*[(s, y) for s, y in zip(scores, labels)][3:]))  # rank 1's share alone differs
    assert one_rank["eer"] != want["eer"] or one_rank["auc"] != want["auc"]


# ----------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------
def test_faces_are_cut_by_their_boxes_and_labelled_by_the_last_label(spoof_dir):
    with open(os.path.join(spoof_dir, "metas", "intra_test", "test_label.json")) as f:
        labels = json.load(f)
    data = CelebASpoof(spoof_dir, "test")
    assert len(data) == len(labels) and data.classes == ["live", "spoof"]
    for (path, target), key in zip(data.samples, sorted(labels)):
        assert path == os.path.join(spoof_dir, key) and target == labels[key][43]
    for index in (0, len(data) - 1):
        path = data.samples[index][0]
        pixels = np.asarray(Image.open(path).convert("RGB"))
        height, width = pixels.shape[:2]
        with open(path[: -len(".png")] + "_BB.txt") as f:
            x, y, w, h, _ = (float(v) for v in f.read().split())
        left, top = int(x * width / 224), int(y * height / 224)  # the box is in a 224 x 224 frame
        want = pixels[top : top + int(h * height / 224), left : left + int(w * width / 224)]
        face = np.asarray(data[index][0])
        assert face.shape == want.shape and (face == want).all()


# ----------------------------------------------------------------------------------------------
# Through the trainer
# ----------------------------------------------------------------------------------------------
def flags(data, out, model="resnet18", size=64):
    return ["--config", os.path.join(ROOT, "configs", "baseline.yaml"), "--dataset", "celeba_spoof", "--data-path", data,
            "--output-dir", out, "--model", model, "--device", "cpu", "--train-crop-size", str(size), "--val-resize-size",
            str(size), "--val-crop-size", str(size), "--batch-size", "8", "--workers", "0", "--lr", "0.05",
            "--lr-warmup-epochs", "0", "--print-freq", "5"]


def train(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "cakd.train", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_resnet18_learns_the_generated_set(spoof_dir, tmp_path, capsys):
    """Its untrained EER (the run's own initial weights, --test-only) is near chance; six epochs
    bring it well below 50%, in metrics.jsonl and TensorBoard, with AUC and APCER / BPCER / ACER;
    summarize.py puts it beside the paper's EER of its cell."""
    out = str(tmp_path / "run")
    before = train(flags(spoof_dir, out) + ["--test-only"])
    eer_before = float(before.split("Test: EER ")[1].split("%")[0])
    train(flags(spoof_dir, out) + ["--epochs", "6"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    last = records[-1]
    assert {"eer", "auc", "apcer", "bpcer", "acer", "eer_threshold"} <= set(last)
    assert eer_before >= 30.0 and last["eer"] <= 15.0 and last["auc"] >= 0.9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/eer")][-1] == pytest.approx(last["eer"])
    import summarize

    assert summarize.main([out]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "| 1.6, Baseline |" in line)
    assert row.startswith(f"| {out} | baseline | resnet18 | 6/6 | {min(r['eer'] for r in records):.2f} / {last['eer']:.2f} |")
    with capsys.disabled():
        print(f"\ngenerated set EER: before {eer_before:.2f}%, after {last['eer']:.2f}% (epoch {last['epoch']})")


@pytest.mark.parametrize("student", ["resnet18", "inception_v3", "resnext26"])
def test_each_table4_cell_has_its_config(student):
    """One YAML per cell: the student alone, Hinton KD and the paper's CAKD from ViT-L/16 on the
    shared set-up, each beside the paper's EER in summarize's table."""
    from cakd.train.config import parse_args
    from cakd.train.published import published_eer

    paper = {"resnet18": (1.6, 1.6, 1.3), "inception_v3": (1.4, 1.4, 1.1), "resnext26": (1.3, 1.3, 0.9)}[student]
    for (recipe, file), eer in zip((("baseline", "baseline"), ("kd", "logits"), ("cakd", "cakd")), paper):
        args = parse_args(["--config", os.path.join(ROOT, "configs", "celeba_spoof", f"{student}_{file}.yaml")])
        assert (args.recipe, args.model, args.dataset, args.train_crop_size) == (recipe, student, "celeba_spoof", 224)
        if recipe != "baseline":
            assert (args.teacher, args.teacher_weights) == ("vit_l_16", "runs/celeba_spoof/teacher/checkpoint.pth")
        assert published_eer(recipe, student, args.teacher)[1] == eer
    args = parse_args(["--config", os.path.join(ROOT, "configs", "celeba_spoof", f"{student}_logits_r152x2.yaml")])
    assert (args.recipe, args.model, args.teacher, args.teacher_weights) == (
        "kd", student, "resnet152x2", "runs/celeba_spoof/teacher_r152x2/checkpoint.pth")
    assert published_eer("kd", student, "resnet152x2") == (
        "Logits (T = ResNet152x2)", {"resnet18": 1.6, "inception_v3": 1.3, "resnext26": 1.3}[student])
    assert parse_args(["--config", os.path.join(ROOT, "configs", "celeba_spoof", "cakd.yaml")]).pca_form == "paper"


def copy_set(spoof_dir, tmp_path):
    root = str(tmp_path / "data")
    subprocess.run(["cp", "-r", spoof_dir, root], check=True)
    return root


def one_error_line(capsys, argv, trained=False):
    """Exit status 1 and one ``error:`` line on stderr, after an epoch of training or before any."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("Epoch: [0]" in captured.out) == trained
    return lines[0]


def test_bad_input_ends_in_one_line_naming_the_file(spoof_dir, tmp_path, capsys):
    root = copy_set(spoof_dir, tmp_path)
    train_labels = os.path.join(root, "metas", "intra_test", "train_label.json")
    os.rename(train_labels, train_labels + ".gone")
    line = one_error_line(capsys, flags(root, str(tmp_path / "a")) + ["--epochs", "1"])
    assert train_labels in line and "does not exist" in line
    os.rename(train_labels + ".gone", train_labels)

    with open(os.path.join(root, "metas", "intra_test", "test_label.json")) as f:
        image = os.path.join(root, sorted(json.load(f))[2])
    os.rename(image, image + ".gone")
    line = one_error_line(capsys, flags(root, str(tmp_path / "b")) + ["--epochs", "1"])
    assert image in line and "does not exist" in line
    os.rename(image + ".gone", image)

    with open(train_labels) as f:
        box = os.path.join(root, sorted(json.load(f))[0])[: -len(".png")] + "_BB.txt"
    with open(box, "w") as f:
        f.write("x=1 y=2\n")
    line = one_error_line(capsys, flags(root, str(tmp_path / "c")) + ["--epochs", "1"], trained=True)
    assert box in line and "does not parse" in line
    assert not os.path.exists(tmp_path / "c" / "checkpoint.pth")

    test_box = box_path(image)  # a test image's box is read before the first epoch
    with open(test_box, "w") as f:
        f.write("10 20 0 0 0.9\n")  # no face
    line = one_error_line(capsys, flags(root, str(tmp_path / "d")) + ["--epochs", "1"])
    assert test_box in line and "does not parse" in line


# ----------------------------------------------------------------------------------------------
# The Table 4 students
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("student_name", ["inception_v3", "resnext26"])
def test_table4_students_step_in_every_recipe_with_gradients_on_every_projector(student_name):
    """At 96x96 a tiny ViT/16 has a 6x6 grid: ResNeXt-26's layer3 is on it, Inception-v3's
    Mixed_6e (4x4) is resized to it. Each recipe's loss reaches every trainable parameter; the
    CAKD projectors (released and paper forms) get non-zero gradients and move in one step."""
    teacher = tiny_vit(image_size=96, num_classes=2)
    images, targets = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1])
    for recipe, options in [("baseline", {}), ("logits", {}), ("kd", {}), ("rkd", {}), ("irg", {}), ("cakd", {}),
                            ("cakd", {"pca_form": "paper", "disc_form": "mlp", "use_cls": True})]:
        torch.manual_seed(0)
        student = cakd.build_student(student_name, num_classes=2, image_size=96)
        distiller = cakd.build_distiller(recipe, student, teacher, image_size=96, **options).train()
        losses = distiller(images, targets, epoch=10**6)
        assert all(torch.isfinite(value) for value in losses.values()), (recipe, losses)
        losses["total"].backward()
        unlearned = [n for n, p in distiller.trainable.named_parameters() if p.requires_grad and p.grad is None]
        assert not unlearned, (recipe, unlearned[:5])
        if recipe == "cakd":
            projectors = {n: p for n, p in distiller.trainable.named_parameters() if not n.startswith("student.")}
            assert {n.split(".")[0] for n in projectors} == {"pca_proj", "gl_proj", "cls_proj"}
            assert all(p.grad.abs().sum() > 0 for p in projectors.values()), recipe
            before = {n: p.detach().clone() for n, p in projectors.items()}
            torch.optim.SGD(distiller.trainable.parameters(), lr=0.1).step()
            assert all(not torch.equal(before[n], p) for n, p in projectors.items())
        distiller.close()
    if student_name == "inception_v3":
        assert distiller.trainable.taps.stage == "Mixed_6e" and distiller.trainable.grid == 6


def test_inception_v3_refuses_images_below_75_pixels(tmp_path, capsys):
    with pytest.raises(ValueError, match="inception_v3 needs images of at least 75x75, not 64"):
        cakd.build_student("inception_v3", num_classes=2, image_size=64)
    for recipe in ("baseline", "cakd"):  # cakd: its pair check, before the student is built
        line = one_error_line(capsys, ["--recipe", recipe, "--model", "inception_v3", "--teacher", "vit_b_16", "--teacher-weights",
                                       "none", "--train-crop-size", "64", "--dataset", "synthetic", "--synthetic-size", "8",
                                       "--num-classes", "2", "--device", "cpu", "--workers", "0", "--output-dir", str(tmp_path / recipe)])
        assert line == "error: inception_v3 needs images of at least 75x75, not 64: raise the crop size"
