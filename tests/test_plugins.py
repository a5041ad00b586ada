"""A user's own method, loaded with --plugin from outside the package: the plug-in of
docs/extending.md, as written there, trains with 2 processes through the launcher, resumes
exactly, and is evaluated by scripts/evaluate.py; what cannot run ends with one line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from make_image_folder import make_image_folder  # noqa: E402
from test_train import ROOT, assert_same_state, free_port  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def plugin_sources():
    """The python blocks of docs/extending.md: the method's file and the teacher family's."""
    with open(os.path.join(ROOT, "docs", "extending.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder outside the package holding my_kd.py and my_teachers.py, and an image folder."""
    root = tmp_path_factory.mktemp("user")
    method, family = plugin_sources()
    (root / "my_kd.py").write_text(method)
    (root / "my_teachers.py").write_text(family)
    make_image_folder(str(root / "data"), num_classes=3, train_per_class=8, val_per_class=2, size=40)
    return root


def flags(folder, out, epochs):
    return ["--plugin", "my_kd", "--plugin", "my_teachers", "--recipe", "my_kd", "--my-alpha", "0.7", "--device", "cpu",
            "--data-path", "data", "--model", "resnet18", "--teacher", "tiny_vit_s16", "--teacher-weights", "none", "--train-crop-size", "32",
            "--val-resize-size", "32", "--val-crop-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", str(epochs),
            "--iters-per-epoch", "2", "--print-freq", "1", "--lr", "0.01", "--output-dir", out, "--resume", "auto"]


def launch(folder, args):
    cmd = [sys.executable, "-m", "cakd.train.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cakd.train", *args]
    return subprocess.run(cmd, cwd=folder, env=ENV, capture_output=True, text=True, timeout=400)


def test_a_plugin_method_trains_with_two_processes_resumes_exactly_and_evaluates(folder):
    whole = launch(folder, flags(folder, "whole", epochs=2))
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = launch(folder, flags(folder, "split", epochs=1))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "my_kd recipe, resnet18 <- tiny_vit_s16" in first.stdout
    second = launch(folder, flags(folder, "split", epochs=2))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from split/checkpoint.pth: epoch 1, step 0" in second.stdout

    saved = torch.load(folder / "split" / "checkpoint.pth", weights_only=True)
    assert saved["args"]["plugin"] == ["my_kd", "my_teachers"] and saved["args"]["my_alpha"] == 0.7 and saved["epoch"] == 1
    assert_same_state(torch.load(folder / "whole" / "checkpoint.pth", weights_only=True)["model"], saved["model"])
    with open(folder / "split" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["epoch"] for m in metrics] == [0, 1] and all(m["train_loss_kd"] >= 0 for m in metrics)

    evaluated = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--checkpoint", "split/checkpoint.pth",
         "--data-path", "data", "--device", "cpu", "--json", "eval.json"],
        cwd=folder, env=ENV, capture_output=True, text=True, timeout=200,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    with open(folder / "eval.json") as f:
        acc1 = json.load(f)["acc1"]
    assert 0.0 <= acc1 <= 100.0


def one_line_failure(folder, args, status):
    done = subprocess.run([sys.executable, "-m", "cakd.train", *args], cwd=folder, env=ENV, capture_output=True, text=True,
                          timeout=200)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


def test_an_unknown_recipe_an_unknown_teacher_and_a_broken_plugin_each_end_with_one_line(folder):
    base = ["--device", "cpu", "--dataset", "synthetic", "--output-dir", "unused"]
    line = one_line_failure(folder, ["--recipe", "my_kdd", *base], 2)
    assert "'my_kdd'" in line and "'kd'" in line  # the registered recipes are listed
    line = one_line_failure(folder, ["--plugin", "my_kd", "--recipe", "my_kd", "--teacher", "vit_q_16", *base], 2)
    assert "'vit_q_16'" in line and "'vit_b_16'" in line and "'swin_l'" in line
    line = one_line_failure(folder, ["--plugin", "no_such_module", "--recipe", "kd", *base], 2)
    assert "--plugin no_such_module: cannot import it" in line and "No module named 'no_such_module'" in line
    (folder / "broken.py").write_text("import torch\nraise RuntimeError('a bug in the plug-in')\n")
    line = one_line_failure(folder, ["--plugin", "broken.py", *base], 2)
    assert "--plugin broken.py: cannot import it (RuntimeError: a bug in the plug-in)" in line


@pytest.fixture
def registry():
    """The registry, and the modules loaded, as before the test: later tests see no plug-in."""
    from cakd.distillers import DISTILLERS

    before, modules = dict(DISTILLERS), set(sys.modules)
    yield DISTILLERS
    DISTILLERS.clear()
    DISTILLERS.update(before)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_a_plugin_recipe_is_in_the_registry_and_its_fields_are_flags(folder, registry):
    from cakd.train.config import get_args_parser, parse_args

    args = parse_args(["--plugin", str(folder / "my_kd.py"), "--recipe", "my_kd", "--my-temperature", "2"])
    assert args.my_temperature == 2.0 and args.my_alpha is None and args.plugin == [str(folder / "my_kd.py")]
    assert registry["my_kd"].__module__ == "cakd_plugin_my_kd"
    help_text = " ".join(get_args_parser().format_help().split())
    assert "--my-alpha MY_ALPHA weight of the soft-target term; the labels get 1 - alpha (default: 0.9)" in help_text
