"""Table 1 on CIFAR-100: a generated CIFAR-100 in torchvision's on-disk format, read by
torchvision's own class, and the four steps of experiments/run_cifar100.sh under torchrun."""
import os
import subprocess
import sys

import torch
import torchvision

from cifar100_files import files_only, make_cifar100
from test_train import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_cifar100_is_read_by_torchvisions_class(tmp_path, monkeypatch):
    root = make_cifar100(str(tmp_path), train_per_class=2, test_per_class=1)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", files_only)  # no md5 sum; the files must be there
    train = torchvision.datasets.CIFAR100(root, train=True)
    test = torchvision.datasets.CIFAR100(root, train=False)
    assert (len(train), len(test), len(train.classes)) == (200, 100, 100)
    image, label = train[3]
    assert image.size == (32, 32) and label == 1 and train.classes[0] == "class_0"
    os.remove(os.path.join(root, "cifar-100-python", "test"))
    try:
        torchvision.datasets.CIFAR100(root, train=False)
        raise AssertionError("a missing file must still be refused")
    except RuntimeError as error:
        assert "not found or corrupted" in str(error)


def test_the_four_steps_of_run_cifar100_with_torchrun(tmp_path):
    """Teacher fine-tuning (a ViT-B/16 student), then baseline, Hinton KD (the paper's "Logits")
    and the paper's CAKD students from that teacher, one short epoch each, 2 CPU processes per step."""
    data = make_cifar100(str(tmp_path / "data"), train_per_class=1, test_per_class=1, num_classes=100)
    site = tmp_path / "site"  # torchrun's processes import it at start: the md5 check goes, nothing else
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom cifar100_files import skip_md5_check\nskip_md5_check()\n" % os.path.join(ROOT, "tests")
    )
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(site)]), "OMP_NUM_THREADS": "1", "NGPUS": "2",
           "STUDENT": "resnet18", "DATA_PATH": data, "OUTPUT_DIR": str(out), "MASTER_PORT": str(free_port()),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    tiny = ["--device", "cpu", "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32",
            "--batch-size", "4", "--workers", "0", "--epochs", "1", "--iters-per-epoch", "2", "--lr-warmup-epochs", "0",
            "--weights", "none", "--print-freq", "1", "--checkpoint-freq", "100"]
    result = subprocess.run(["sh", os.path.join(ROOT, "experiments", "run_cifar100.sh"), *tiny], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    teacher_checkpoint = str(out / "teacher" / "checkpoint.pth")
    for step, recipe, model in (("teacher", "baseline", "vit_b_16"), ("baseline", "baseline", "resnet18"),
                                ("logits", "kd", "resnet18"), ("cakd", "cakd", "resnet18")):
        checkpoint = torch.load(out / step / "checkpoint.pth", weights_only=True)
        args = checkpoint["args"]
        assert (checkpoint["epoch"], args["recipe"], args["model"], args["dataset"]) == (0, recipe, model, "cifar100"), step
        assert args["lr_scheduler"] == ("cosineannealinglr" if step == "teacher" else "multisteplr"), step
        if step in ("logits", "cakd"):
            assert args["teacher"] == "vit_b_16" and args["teacher_weights"] == teacher_checkpoint
        assert os.path.getsize(out / step / "metrics.jsonl") > 0
    cakd_step = torch.load(out / "cakd" / "checkpoint.pth", weights_only=True)  # Table 1's CAKD: the paper's
    assert (cakd_step["args"]["pca_form"], cakd_step["args"]["logits_form"], cakd_step["args"]["disc_form"]) == ("paper", "kd", "mlp")
    assert "pca_proj.to_qkv.weight" in cakd_step["projectors"] and "cls_proj.weight" not in cakd_step["projectors"]
    assert result.stdout.count("Test: Acc@1") == 4 and "(100 images)" in result.stdout
