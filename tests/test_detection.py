"""The detection trainer (cakd.detection, the paper's Table 4) on a COCO-format set the tests make
(coloured shapes on noise, cakd.detection.shapes), through pycocotools and the real trainer.

The evaluation is checked against AP worked out by hand from COCO's definition (101-point
interpolated precision, IoU thresholds 0.50:0.05:0.95), never against the code under test.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from cakd.weights import export_student, save_atomic  # noqa: E402
from cakd.detection import models as det_models  # noqa: E402
from cakd.detection.coco_eval import evaluate_detections, to_coco  # noqa: E402
from cakd.detection.shapes import make_shapes  # noqa: E402
from cakd.detection.trainer import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("shapes")), train=48, val=8, size=96, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A smaller set for the runs whose numbers are compared, not judged."""
    return make_shapes(str(tmp_path_factory.mktemp("tiny")), train=16, val=4, size=64, seed=1)


def small_flags(data, out, detector="fasterrcnn", epochs=1, size=64):
    return ["--data-path", data, "--output-dir", out, "--device", "cpu", "--detector", detector, "--backbone", "resnet18",
            "--backbone-weights", "none", "--trainable-backbone-layers", "5", "--no-frozen-bn", "--min-size", str(size),
            "--max-size", str(size), "-b", "2", "-j", "0", "--epochs", str(epochs), "--lr", "0.01", "--lr-batch", "2",
            "--lr-warmup-iters", "2", "--box-batch-size-per-image", "32", "--rpn-post-nms-top-n-train", "100",
            "--rpn-post-nms-top-n-test", "50", "--box-detections-per-img", "10", "--print-freq", "1"]


# ---- (a) the evaluation ---------------------------------------------------------------------
def ground_truth_as_output(coco, image_id, with_masks):
    """The image's annotations as the detector would return them (boxes xyxy, score 1)."""
    anns = coco.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
    output = {"boxes": boxes, "scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns])}
    if with_masks:
        output["masks"] = torch.stack([torch.from_numpy(coco.annToMask(a)).float()[None] for a in anns])
    return output


def test_ground_truth_fed_back_scores_ap_1(shapes):
    coco = COCO(os.path.join(shapes, "annotations", "instances_val2017.json"))
    detections = {i: to_coco(i, ground_truth_as_output(coco, i, True), True) for i in coco.getImgIds()}
    before = json.dumps(coco.dataset)
    metrics, _ = evaluate_detections(coco, detections, ("bbox", "segm"))
    assert json.dumps(coco.dataset) == before  # the dataset's own annotations are read again next epoch
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}_AP"] == pytest.approx(100.0) and metrics[f"{kind}_AP50"] == pytest.approx(100.0)


def iou_xywh(a, b):
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_a_shifted_box_lowers_ap_as_computed_by_hand(tmp_path):
    """One image, two boxes of one category. Detected: the first exactly (score 0.9), the second
    shifted by 4 px (score 0.8). At a threshold the shifted box's IoU reaches, both match:
    precision 1 at every recall, AP 1. Below it the ranked list is TP, FP: precision 1 up to
    recall 0.5 and none beyond, so 51 of the 101 recall points (0, 0.01, ..., 0.5) have precision 1."""
    gt = [[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 20.0, 20.0]]
    coco_json = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, b in enumerate(gt)],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_json))
    coco = COCO(str(path))
    shifted = [gt[1][0] + 4, gt[1][1], gt[1][2], gt[1][3]]
    boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (gt[0], shifted)])
    output = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}
    metrics, _ = evaluate_detections(coco, {1: to_coco(1, output, False)}, ("bbox",))

    iou = iou_xywh(gt[1], shifted)  # 16 * 20 / (400 + 400 - 320) = 2/3
    matched = sum(iou >= t for t in THRESHOLDS)
    expected = (matched * 1.0 + (10 - matched) * 51 / 101) / 10
    assert 0 < matched < 10
    assert metrics["bbox_AP"] == pytest.approx(100 * expected, abs=1e-6)
    assert metrics["bbox_AP50"] == pytest.approx(100.0) and metrics["bbox_AP75"] == pytest.approx(100 * 51 / 101, abs=1e-6)


# ---- (c) the backbone from an exported student, and strict loading ---------------------------
def random_student(name="resnet18"):
    """A classification student with every entry random, BatchNorm statistics included."""
    torch.manual_seed(3)
    student = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():
        for buffer in student.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return student


def test_backbone_from_an_exported_student_is_that_student_tensor_for_tensor(tmp_path):
    exported = export_student(random_student())
    path = str(tmp_path / "student.pth")
    save_atomic(exported, path)
    detector = det_models.build_detector("fasterrcnn", "resnet18", num_classes=4, min_size=64, max_size=64)
    line = det_models.initialise(detector, path, "resnet18")
    assert line == f"backbone from {path} (exported student)"
    body = detector.backbone.body.state_dict()
    expected = {k: v for k, v in exported.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(body) == set(expected)
    for key, value in expected.items():
        assert torch.equal(body[key], value), key

    # a training checkpoint of ours: its student, and its recipe in the header line
    checkpoint = str(tmp_path / "checkpoint.pth")
    save_atomic({"model": exported, "projectors": {}, "optimizer": {}, "lr_scheduler": {}, "epoch": 0,
                 "args": {"model": "resnet18", "recipe": "cakd"}}, checkpoint)
    again = det_models.build_detector("fasterrcnn", "resnet18", num_classes=4, min_size=64, max_size=64)
    assert det_models.initialise(again, checkpoint, "resnet18") == f"backbone from {checkpoint} (training checkpoint, recipe cakd, resnet18)"
    assert all(torch.equal(again.backbone.body.state_dict()[key], value) for key, value in expected.items())
    with pytest.raises(det_models.UserError, match="is a resnet18 \\(its run's --model\\), not a resnet50: pass --backbone resnet18"):
        det_models.initialise(again, checkpoint, "resnet50")


def test_a_backbone_that_does_not_fit_is_one_error_line(tiny, tmp_path, capsys):
    broken = export_student(random_student())
    del broken["layer4.1.bn2.weight"]
    path = str(tmp_path / "broken.pth")
    save_atomic(broken, path)
    out = str(tmp_path / "out")
    flags = small_flags(tiny, out) + ["--backbone-weights", path, "--frozen-bn"]
    assert main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --backbone-weights {path} (exported student) does not fit the detector's "
                                               "backbone (Missing key(s) in state_dict: \"layer4.1.bn2.weight\"")
    other = str(tmp_path / "resnet34.pth")
    save_atomic(export_student(random_student("resnet34")), other)
    assert main(small_flags(tiny, out) + ["--backbone-weights", other]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the detector's backbone (Unexpected key(s) in state_dict" in err[0]
    assert not os.path.exists(out)  # nothing written: a failed start leaves no folder behind


def test_without_pycocotools_the_trainer_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    assert main(small_flags(tiny, str(tmp_path / "out"))) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: pycocotools is not installed, and COCO data and evaluation need it: pip install pycocotools "
        "(or pip install -e '.[detection]')"
    ]


def test_help_shows_defaults_and_every_config_parses(capsys):
    from cakd.detection.config import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--backbone-weights" in text and "(default: IMAGENET1K_V1)" in text and "(default: [8, 11])" in text
    for detector in ("frcnn", "mrcnn"):
        for backbone, name in (("r50", "resnet50"), ("r101", "resnet101"), ("x101", "resnext101_32x8d")):
            args = parse_args(["--config", os.path.join(ROOT, "configs", f"detection_{detector}_{backbone}.yaml")])
            assert args.backbone == name and args.detector == {"frcnn": "fasterrcnn", "mrcnn": "maskrcnn"}[detector]
            assert (args.epochs, args.lr, args.lr_batch, args.lr_steps, args.lr_warmup_iters) == (12, 0.02, 16, [8, 11], 1000)
            assert (args.min_size, args.max_size, args.trainable_backbone_layers, args.frozen_bn) == (800, 1333, 3, True)


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--momentum", "-0.5"), ("--weight-decay", "-1"),
                                        ("--lr-warmup-factor", "-0.1"), ("--workers", "-1")])
def test_a_value_torch_would_refuse_is_one_line_before_anything_is_built(flag, value, capsys):
    from cakd.detection.config import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args([flag, value])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {flag} {float(value) if flag != '--workers' else value}: ") and last.endswith("; see --help")


# ---- the run: config.yaml, metrics.jsonl, TensorBoard, AMP, --test-only ------------------------
def test_a_bf16_run_writes_its_folder_and_test_only_agrees(tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    flags = small_flags(tiny, out, detector="maskrcnn") + ["--iters-per-epoch", "2", "--amp", "--amp-dtype", "bfloat16"]
    assert main(flags) == 0
    printed = capsys.readouterr().out
    assert "cakd.detection: maskrcnn resnet18 FPN, random backbone; 1 process(es) x 2 images = 2 per step" in printed
    record = json.loads(open(os.path.join(out, "metrics.jsonl")).read())
    assert record["epoch"] == 0 and record["train_loss_mask"] > 0
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP", "segm_APl"):
        assert key in record
    import yaml

    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["detector"] == "maskrcnn" and saved["amp_dtype"] == "bfloat16" and "resume" not in saved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_mask", "train/lr", "val/bbox_AP", "val/segm_AP"} <= tags
    checkpoint = os.path.join(out, "checkpoint.pth")
    assert main(flags + ["--test-only", "--resume", checkpoint]) == 0
    assert f"Test: bbox_AP {record['bbox_AP']:.2f}  segm_AP {record['segm_AP']:.2f}" in capsys.readouterr().out
    assert main(flags) == 1  # a fresh start over a checkpoint is refused
    assert "exists and this run starts fresh" in capsys.readouterr().err


# ---- (d), (e) two processes under the launcher, SIGTERM mid-epoch, exact resume ------------------
def test_two_processes_under_the_launcher_stop_on_sigterm_and_resume_exactly(tiny, tmp_path):
    """The launcher and its output as tests/test_preemption.py runs them for the classification trainer."""
    from test_preemption import launch, run
    from test_train import assert_same_state

    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    flags = ["--iters-per-epoch", "0", "--resume", "auto"]  # 16 images / (2 x 2) = 4 steps an epoch
    code, stdout, stderr = run(launch(small_flags(tiny, full) + flags, trainer="cakd.detection"), tmp_path=tmp_path)
    assert code == 0 and "2 process(es) x 2 images = 4 per step" in stdout, stderr[-3000:]
    release = str(tmp_path / "release")

    def act(proc, line):  # rank 0 is held after step 0's line: SIGTERM, then let go once its handler ran
        if line.startswith("held: requested False"):
            proc.send_signal(signal.SIGTERM)
        elif line.startswith("held: requested True"):
            open(release, "w").close()

    code, stdout, stderr = run(launch(small_flags(tiny, out) + flags, held=True), "held: requested", act, tmp_path, every=True,
                               env={"HOLD_TRAINER": "cakd.detection", "HOLD_AFTER": "Epoch: [0] [0/4]", "HOLD_RELEASE": release})
    assert code == 0 and stderr.strip() == "", stderr[-3000:]
    step = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]
    assert step == 2 and "SIGTERM: saved epoch 0 step 2" in stdout  # the first check after it: step 1's
    code, stdout, stderr = run(launch(small_flags(tiny, out) + flags, trainer="cakd.detection"), tmp_path=tmp_path)
    assert code == 0 and f"resumed from {out}/checkpoint.pth: epoch 0, step {step}" in stdout, stderr[-3000:]
    assert_same_state(torch.load(os.path.join(full, "checkpoint.pth"), weights_only=True),
                      torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True), skip={".args.output_dir"})
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [0]


# ---- (b) learning: box AP and mask AP rise well above their first evaluation -------------------
LEARNING = ["--min-size", "96", "--max-size", "96", "-b", "4", "--epochs", "6", "--lr", "0.01", "--lr-batch", "4",
            "--clip-grad-norm", "5", "--lr-warmup-iters", "10", "--lr-steps", "5", "--box-batch-size-per-image", "32",
            "--rpn-post-nms-top-n-train", "300", "--rpn-post-nms-top-n-test", "100", "--box-detections-per-img", "10",
            "--print-freq", "100"]


@pytest.mark.parametrize("detector,metrics", [("fasterrcnn", ("bbox_AP",)), ("maskrcnn", ("bbox_AP", "segm_AP"))])
def test_a_detector_learns_the_shapes(detector, metrics, shapes, tmp_path, capsys):
    """A random ResNet-18 FPN backbone (BatchNorm trained, as from scratch) on 48 images of 96 px:
    after 6 epochs of 12 steps (the lr x0.1 in the last) the AP on 8 validation images is several
    times its first evaluation's (after epoch 0)."""
    out = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums in the same order on any CPU: with 2 threads the same
    try:  # flags ended at 9.7 box AP where one thread gives 26.6 (README), a run this short is that sensitive
        assert main(small_flags(shapes, out, detector) + LEARNING) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for metric in metrics:
        first, last = records[0][metric], records[-1][metric]
        print(f"{detector} {metric}: first {first:.2f}, last {last:.2f}")
        assert last > max(3 * first, first + 10), (metric, [r[metric] for r in records])


# ---- scripts/summarize.py: Table 4's rows beside ours --------------------------------------------
def test_summarize_puts_a_detection_run_beside_table_4(tmp_path, capsys):
    import yaml

    run_dir = tmp_path / "frcnn"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"detector": "maskrcnn", "backbone": "resnet50", "epochs": 12,
                                                          "backbone_weights": "runs/cakd/checkpoint.pth"}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "bbox_AP": 30.0 + e, "segm_AP": 28.0 + e}) + "\n"
                                                   for e in range(12)))
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import summarize

    assert summarize.main([str(run_dir)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {run_dir} ")]
    assert row == [f"| {run_dir} | maskrcnn | resnet50 (runs/cakd/checkpoint.pth) | 12/12 | 41.00 | 39.00 | segm_AP | "
                   "32.6 / 33.3 / 33.1 / 33.6 |"]


def test_the_lr_schedule_is_the_1x_one_by_iteration():
    """Linear warmup from 0.001 over 5 iterations, then x0.1 at epochs 8 and 11 (10 steps an epoch),
    worked out by hand."""
    from cakd.detection.engine import LrFactor

    factor = LrFactor(steps_per_epoch=10, warmup_iters=5, warmup_factor=0.001, milestones=(8, 11), gamma=0.1)
    expected = {0: 0.001, 2: 0.001 * 0.6 + 0.4, 5: 1.0, 79: 1.0, 80: 0.1, 109: 0.1, 110: 0.01, 119: 0.01}
    for iteration, value in expected.items():
        assert factor(iteration) == pytest.approx(value, rel=1e-12), iteration


def test_a_missing_coco_folder_is_one_error_line(tmp_path, capsys):
    missing = str(tmp_path / "coco")
    assert main(small_flags(missing, str(tmp_path / "out"))) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {missing}/val2017 does not exist: --data-path must hold COCO 2017's train2017/, val2017/ and "
        "annotations/instances_{train,val}2017.json"
    ]


def test_run_detection_sh_help_is_printed_once_with_the_values_it_runs():
    env = {**ENV, "NGPUS": "2", "CONFIG": "detection_mrcnn_x101", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["sh", os.path.join(ROOT, "experiments", "run_detection.sh"), "--backbone-weights", "runs/x.pth", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)
    out = " ".join(result.stdout.split())
    assert result.returncode == 0 and result.stderr == "" and out.count("usage: python -m cakd.detection") == 1, result.stderr
    assert "[this command: maskrcnn] (default: fasterrcnn)" in out and "[this command: runs/x.pth]" in out
    assert "[this command: runs/detection_mrcnn_x101]" in out and "[this command: auto]" in out
