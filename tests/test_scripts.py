"""The scripts around a run (scripts/evaluate.py, export.py, attention_maps.py, summarize.py),
on one tiny CAKD run trained here: evaluation agrees with the trainer's own, exports load into
torchvision with the same logits, the pictures decode with the expected size, the summary
table holds the runs' and the published numbers."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torchvision

from make_image_folder import make_image_folder
from cakd.corruptions import CORRUPTIONS
from cakd.train import main as train_main
from test_train import free_port, small_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
VAL_IMAGES = 21  # 7 classes x 3: top-5 is not always 100, and an odd count splits 11 + 10 over two processes


def load_script(name):
    """``scripts/<name>.py`` as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {name: load_script(name) for name in ("evaluate", "export", "attention_maps", "summarize", "transferability")}


def call(name, argv, capsys):
    """Run a script's main; returns (exit status, stdout, stderr lines)."""
    code = SCRIPTS[name].main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the cakd recipe (projectors, EMA, random ViT-B/16 teacher at 64x64),
    evaluated also under the corruption protocol (``--eval-views``)."""
    root = tmp_path_factory.mktemp("scripts")
    data = make_image_folder(str(root / "data"), num_classes=7, train_per_class=3, val_per_class=3, size=72)
    out = str(root / "run")
    assert train_main(small_flags("cakd", data, out, epochs=1) + ["--eval-views"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.read().splitlines()[-1])
    checkpoint = os.path.join(out, "checkpoint.pth")
    return SimpleNamespace(data=data, out=out, checkpoint=checkpoint, record=record, root=root)


def decode_png(path):
    with warnings.catch_warnings():  # torchvision 0.29 marks its PNG codec deprecated (TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torchvision.io.decode_png(torchvision.io.read_file(str(path)))


def trainer_line(header, acc1, acc5):
    return f"{header} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({VAL_IMAGES} images)"


def released_checkpoint(trained, path):
    """The trained run rewritten in the released code's layout (see tests/test_checkpoint.py):
    student and projectors in one ``model`` dict, 16 group Linears as ``fc_layer_{g}``, the
    never-used ``pca_proj.to_out``, an EMA of the whole module, ``args`` an argparse.Namespace."""
    ckpt = torch.load(trained.checkpoint, weights_only=True)
    projectors = ckpt["projectors"]

    def released(student):
        state = dict(student)
        state["pca_proj.to_qkv.weight"] = projectors["pca_proj.to_qkv.weight"]
        width = projectors["pca_proj.to_qkv.weight"].shape[0] // 3
        state["pca_proj.to_out.0.weight"] = torch.randn(width, width)
        state["pca_proj.to_out.0.bias"] = torch.randn(width)
        for g in range(projectors["gl_proj.weight"].shape[0]):
            state[f"gl_proj.layers.fc_layer_{g}.weight"] = projectors["gl_proj.weight"][g]
            state[f"gl_proj.layers.fc_layer_{g}.bias"] = projectors["gl_proj.bias"][g]
        state["cls_proj.weight"], state["cls_proj.bias"] = projectors["cls_proj.weight"], projectors["cls_proj.bias"]
        return state

    ema = {k[len("module."):]: v for k, v in ckpt["model_ema"].items() if k != "n_averaged"}
    args = argparse.Namespace(model="resnet18", train_crop_size=64, val_resize_size=64, val_crop_size=64, batch_size=4, data_path=trained.data,
                              interpolation="bilinear", teacher="vit_b_16", teacher_weights="none", seed=0)
    model_ema = {"n_averaged": ckpt["model_ema"]["n_averaged"], **{"module." + k: v for k, v in released(ema).items()}}
    torch.save({"model": released(ckpt["model"]), "model_ema": model_ema, "optimizer": {}, "lr_scheduler": {},
                "epoch": 0, "args": args}, path)
    return path


# ----------------------------------------------------------------------------------------------
# evaluate.py
# ----------------------------------------------------------------------------------------------
def test_evaluate_agrees_with_the_training_loop(trained, tmp_path, capsys):
    """Student and EMA of the checkpoint, an exported student, and the released layout of the
    same weights all give exactly the numbers the trainer wrote to metrics.jsonl."""
    r = trained.record
    exported = str(tmp_path / "student.pth")
    assert call("export", ["--checkpoint", trained.checkpoint, "--output", exported], capsys)[0] == 0
    released = released_checkpoint(trained, str(tmp_path / "released.pth"))
    eval_flags = ["--data-path", trained.data, "--val-resize-size", 64, "--val-crop-size", 64, "--batch-size", 4]
    cases = [
        ([trained.checkpoint, "--which", "student"], "Test:", "acc1", "acc5"),
        ([trained.checkpoint, "--which", "ema"], "Test: EMA", "ema_acc1", "ema_acc5"),
        ([exported, *eval_flags], "Test:", "acc1", "acc5"),  # no args in the file: arch inferred, sizes given
        ([released, "--which", "student"], "Test:", "acc1", "acc5"),
        ([released, "--which", "ema"], "Test: EMA", "ema_acc1", "ema_acc5"),
    ]
    for argv, header, top1, top5 in cases:
        numbers = tmp_path / "numbers.json"
        code, out, err = call("evaluate", ["--checkpoint", *argv, "--workers", 0, "--json", numbers], capsys)
        assert code == 0, err
        assert trainer_line(header, r[top1], r[top5]) in out, (argv, out[-500:])
        written = json.loads(numbers.read_text())
        assert (written["acc1"], written["acc5"], written["images"]) == (r[top1], r[top5], VAL_IMAGES)
        assert f"({VAL_IMAGES} images, resize 64 / crop 64, 1 process(es))" in out  # the run's sizes, or the ones given
    code, out, err = call("evaluate", ["--checkpoint", exported, "--data-path", trained.data, "--workers", 0], capsys)
    assert code == 0 and "resize 224 / crop 224 (the released recipes' eval sizes: this file holds no flags" in out, err


VIEW_KEYS = [f"views_{name}_{k}" for name in CORRUPTIONS + ("mean",) for k in ("acc1", "acc5")]


def test_evaluate_views_agree_with_the_trainer_whatever_the_batch(trained, tmp_path, capsys):
    """--views: the clean and per-transform numbers are the trainer's --eval-views ones, with the
    run's batch size (4) and another (5): each image's view is seeded by its index."""
    r = trained.record
    for batch_size in (4, 5):
        numbers = tmp_path / "views.json"
        argv = ["--checkpoint", trained.checkpoint, "--views", "--batch-size", batch_size, "--workers", 0, "--json", numbers]
        code, out, err = call("evaluate", argv, capsys)
        assert code == 0, err
        assert trainer_line("Test:", r["acc1"], r["acc5"]) in out
        assert f"Test: view elastic Acc@1 {r['views_elastic_acc1']:.3f} Acc@5 {r['views_elastic_acc5']:.3f} ({VAL_IMAGES} images)" in out
        written = json.loads(numbers.read_text())
        assert {key: written[key] for key in VIEW_KEYS} == {key: r[key] for key in VIEW_KEYS}, batch_size
        assert written["views_seed"] == 0 and written["views_protocol"] == "corruptions"


def test_evaluate_under_torchrun_counts_every_image_once(trained, tmp_path):
    """With --views too: the 2 processes' shards give the single process's numbers."""
    numbers = tmp_path / "ema.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "scripts", "evaluate.py"), "--checkpoint",
           trained.checkpoint, "--which", "ema", "--device", "cpu", "--workers", "0", "--json", str(numbers), "--views"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    r = trained.record
    assert trainer_line("Test: EMA", r["ema_acc1"], r["ema_acc5"]) in result.stdout
    assert "2 process(es)" in result.stdout and result.stdout.count("Test: EMA Acc@1") == 1  # rank 0 prints
    written = json.loads(numbers.read_text())
    assert (written["acc1"], written["acc5"]) == (r["ema_acc1"], r["ema_acc5"])
    assert {key: written[key] for key in VIEW_KEYS} == {key: r["ema_" + key] for key in VIEW_KEYS}


def test_evaluate_the_teacher_and_bad_input(trained, tmp_path, capsys):
    code, out, err = call("evaluate", ["--checkpoint", trained.checkpoint, "--which", "teacher", "--workers", 0], capsys)
    assert code == 0, err
    assert f"({VAL_IMAGES} images)" in out and "Test: teacher Acc@1" in out
    assert err == ["warning: --teacher-weights none: a random teacher, its accuracy means nothing"]

    head_only = tmp_path / "vit_1000_classes.pth"  # enough for the class check, which comes first
    torch.save({"heads.head.weight": torch.zeros(1000, 768)}, head_only)
    two_classes = make_image_folder(str(tmp_path / "two"), num_classes=2, train_per_class=1, val_per_class=1, size=72)
    exported = str(tmp_path / "student.pth")
    assert call("export", ["--checkpoint", trained.checkpoint, "--output", exported], capsys)[0] == 0
    bad = [
        (["--checkpoint", trained.checkpoint, "--which", "teacher", "--teacher-weights", head_only], "predict 1000 classes, not 7"),
        (["--checkpoint", trained.checkpoint, "--data-path", two_classes], "predicts 7 classes but"),
        (["--checkpoint", exported, "--which", "ema", "--data-path", trained.data], "is a plain student state dict: it has no EMA"),
        (["--checkpoint", exported, "--model", "resnet34", "--data-path", trained.data], "does not fit a resnet34 student"),
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth does not exist"),
        (["--checkpoint", exported], "no data path given"),
        (["--which", "student"], "--which student needs --checkpoint"),
    ]
    for argv, message in bad:
        code, out, err = call("evaluate", [*argv, "--workers", 0], capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


# ----------------------------------------------------------------------------------------------
# export.py
# ----------------------------------------------------------------------------------------------
def test_export_round_trips_with_identical_logits(trained, tmp_path, capsys):
    ckpt = torch.load(trained.checkpoint, weights_only=True)
    images = torch.randn(3, 3, 64, 64)
    for which in ("student", "ema"):
        path = tmp_path / f"{which}.pth"
        code, out, err = call("export", ["--checkpoint", trained.checkpoint, "--which", which, "--output", path], capsys)
        assert code == 0, err
        assert "max abs diff 0 (identical)" in out and "torchvision.models.resnet18(num_classes=7)" in out
        plain = torchvision.models.get_model("resnet18", num_classes=7)
        plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
        trained_student = torchvision.models.resnet18(num_classes=7)
        if which == "student":
            trained_student.load_state_dict(ckpt["model"])
        else:  # the EMA as the trainer keeps it: an AveragedModel around the student
            averaged = torch.optim.swa_utils.AveragedModel(trained_student, use_buffers=True)
            averaged.load_state_dict(ckpt["model_ema"])
            trained_student = averaged.module
        with torch.no_grad():
            assert torch.equal(plain.eval()(images), trained_student.eval()(images))

    path = tmp_path / "student.pth"
    before = path.read_bytes()
    code, out, err = call("export", ["--checkpoint", trained.checkpoint, "--which", "ema", "--output", path], capsys)
    assert code == 1 and len(err) == 1 and "exists: pass --force" in err[0]
    assert path.read_bytes() == before
    code, out, err = call("export", ["--checkpoint", trained.checkpoint, "--which", "ema", "--output", path, "--force"], capsys)
    assert code == 0 and path.read_bytes() != before
    assert set(os.listdir(tmp_path)) == {"student.pth", "ema.pth"}  # no temporary file left behind


@pytest.mark.parametrize("breakage", ["key dropped", "tensor altered"])
def test_export_check_refuses_a_broken_export(trained, tmp_path, capsys, monkeypatch, breakage):
    """The check compares the export with the checkpoint's distiller (or the trainer's EMA
    wrapper), not with the export itself: a broken export is refused and nothing is written."""
    export = SCRIPTS["export"]
    good = export.exported_state

    def broken(checkpoint, which):
        state = good(checkpoint, which)
        if breakage == "key dropped":
            del state["layer3.0.bn1.running_var"]
        else:
            state["layer3.0.bn1.running_var"] = state["layer3.0.bn1.running_var"] * 1.01
        return state

    monkeypatch.setattr(export, "exported_state", broken)
    message = "does not load into torchvision.models.resnet18" if breakage == "key dropped" else "gives other logits"
    for which in ("student", "ema"):
        path = tmp_path / f"{which}.pth"
        code, out, err = call("export", ["--checkpoint", trained.checkpoint, "--which", which, "--output", path], capsys)
        assert code == 1 and len(err) == 1 and message in err[0], (which, err)
        assert not path.exists()


def test_export_command_line_error_is_one_line(tmp_path):
    """Run as ``python scripts/export.py``: bad input is one ``error:`` line and status 1."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export.py"), "--checkpoint",
                             str(tmp_path / "none.pth"), "--output", str(tmp_path / "out.pth")],
                            capture_output=True, text=True, env=ENV, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'none.pth'} does not exist: check the path"]
    assert not (tmp_path / "out.pth").exists()


# ----------------------------------------------------------------------------------------------
# attention_maps.py
# ----------------------------------------------------------------------------------------------
def test_attention_maps_png(trained, tmp_path, capsys):
    png = tmp_path / "maps" / "attention.png"
    code, out, err = call("attention_maps", ["--checkpoint", trained.checkpoint, "--output", png, "--num-images", 3], capsys)
    assert code == 0, err
    image = decode_png(png)
    # matplotlib: 12 x (2.8 rows + 0.4) inches at 100 dpi; an image and its three maps per row
    assert image.dtype == torch.uint8 and tuple(image.shape[1:]) == (880, 1200) and image.float().std() > 20
    assert "(1200x880 px, 3 rows: image | teacher | student | |difference|)" in out
    assert out.count("teacher|student scale") == 3 and "maps 16x16" in out  # 64x64 input, patch 16: 4x4 tokens
    rows = [line.split("/")[0] for line in out.splitlines() if "teacher|student scale" in line]
    assert rows == ["class_0", "class_1", "class_2"]  # one image of each class, not the first three of one
    assert "with BatchNorm on running statistics (eval mode)" in out

    # the same weights in the released layout draw the same picture (the random teacher is redrawn from the seed)
    released = released_checkpoint(trained, str(tmp_path / "released.pth"))
    again = tmp_path / "released.png"
    code, out, err = call("attention_maps", ["--checkpoint", released, "--output", again, "--num-images", 3], capsys)
    assert code == 0, err
    assert again.read_bytes() == png.read_bytes()

    code, out, err = call("attention_maps", ["--checkpoint", trained.checkpoint, "--output", again, "--num-images", 1,
                                             "--batch-stats"], capsys)
    assert code == 0 and tuple(decode_png(again).shape[1:]) == (320, 1200) and "batch statistics" in out

    exported = str(tmp_path / "student.pth")
    assert call("export", ["--checkpoint", trained.checkpoint, "--output", exported], capsys)[0] == 0
    code, out, err = call("attention_maps", ["--checkpoint", exported, "--output", tmp_path / "x.png"], capsys)
    assert code == 1 and len(err) == 1 and "holds no projectors" in err[0]


def test_attention_figure_says_its_batchnorm_mode_and_rows_span_the_classes():
    module = SCRIPTS["attention_maps"]
    assert module.pick_rows([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1] and module.pick_rows([0, 0], 5) == [0, 1]
    maps = torch.rand(2, 16, 16)
    fig = module.figure(torch.rand(2, 3, 64, 64), maps, maps, ["a", "b"], "student with BatchNorm on batch statistics")
    assert fig._suptitle.get_text() == "student with BatchNorm on batch statistics"
    assert fig.axes[1].get_title() == "teacher q k^T (16 tokens, a 4x4 grid)"


def test_training_writes_the_attention_maps_to_tensorboard(trained):
    """Rank 0 logs teacher | student | |difference| maps of the first 4 validation images after
    each evaluation: 16x16 maps scaled 8x, three titled columns, four rows, a colour bar with
    its ends written beside the shared teacher/student scale and beside the difference's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(trained.out, "tensorboard"), size_guidance={"images": 0}).Reload()
    tag = "attention/teacher|student|difference"
    assert tag in events.Tags()["images"]
    (logged,) = events.Images(tag)  # one epoch, one picture
    side, bars = 128, 2 * (10 + 48)  # a map, and a colour bar with its labels
    assert logged.step == 0 and (logged.width, logged.height) == (3 * side + 3 * 6 + 2 * 2 - 6 + bars, 16 + 4 * (side + 6))
    image = torchvision.io.decode_image(torch.frombuffer(bytearray(logged.encoded_image_string), dtype=torch.uint8))
    assert image.float().std() > 20 and (image[0] != image[2]).float().mean() > 0.3  # colour, not grey
    assert (image[:, :16, :60] < 100).any()  # the first column's title is written in the top strip
    bar = image[:, 16 + 64, 264:274].float()  # the teacher/student colour bar, halfway down the first row
    assert bar.std(1).max() < 1 and (image[:, 16, 264] != image[:, 16 + side - 1, 264]).any()  # one colour across, a ramp down


# ----------------------------------------------------------------------------------------------
# every checkpoint kind the trainer writes
# ----------------------------------------------------------------------------------------------
DRAWS_MAPS = {"cakd", "cakd_paper", "ablation_pca", "ablation_robust"}


@pytest.mark.parametrize("config", ["baseline", "logits", "cakd", "cakd_paper", "ablation_logits", "ablation_gl",
                                    "ablation_pca", "ablation_robust"])
def test_every_recipe_checkpoint_goes_through_the_scripts(config, trained, tmp_path, capsys):
    """A one-step run of each released, paper and ablation config: evaluate.py gives the
    trainer's own numbers, export.py's check passes, attention_maps.py draws the maps where
    there is an attention projector and says in one line why not where there is none."""
    out = str(tmp_path / config)
    flags = ["--config", os.path.join(ROOT, "configs", f"{config}.yaml"), "--device", "cpu", "--data-path", trained.data,
             "--output-dir", out, "--model", "resnet18", "--teacher-weights", "none", "--train-crop-size", "64",
             "--val-resize-size", "64", "--val-crop-size", "64", "--batch-size", "4", "--workers", "0", "--epochs", "1",
             "--iters-per-epoch", "1", "--lr-warmup-epochs", "0"]
    assert train_main(flags) == 0
    capsys.readouterr()
    record = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    checkpoint = os.path.join(out, "checkpoint.pth")

    code, printed, err = call("evaluate", ["--checkpoint", checkpoint, "--workers", 0], capsys)
    assert code == 0, err
    assert trainer_line("Test:", record["acc1"], record["acc5"]) in printed
    code, printed, err = call("export", ["--checkpoint", checkpoint, "--output", tmp_path / "student.pth"], capsys)
    assert code == 0, err
    png = tmp_path / "maps.png"
    code, printed, err = call("attention_maps", ["--checkpoint", checkpoint, "--output", png, "--num-images", 1], capsys)
    if config in DRAWS_MAPS:
        assert code == 0, err
        image = decode_png(png)
        assert tuple(image.shape[1:]) == (320, 1200) and image.float().std() > 20
    else:
        assert code == 1 and len(err) == 1 and "attention projector" in err[0] and "no map to draw" in err[0]
        assert not png.exists()


# ----------------------------------------------------------------------------------------------
# transferability.py
# ----------------------------------------------------------------------------------------------
def test_transferability_matches_a_plain_recomputation(trained, tmp_path, capsys):
    """Figure 3(b) on the tiny run, against the hook-free reference: the run's random teacher
    drawn again from its seed, layer3 tokens of the trained student, the group-wise projector
    applied per group, a least-squares map fitted with torch.linalg.lstsq."""
    from reference_impl import group_projector, student_forward, teacher_forward

    from cakd.train.data import ClassificationPresetEval

    numbers = tmp_path / "transfer.json"
    code, out, err = call("transferability", ["--checkpoint", trained.checkpoint, "--workers", 0, "--json", numbers], capsys)
    assert code == 0, err
    got = json.loads(numbers.read_text())
    assert got["images"] == VAL_IMAGES and got["tokens"] == VAL_IMAGES * 16 and "mean cosine" in out

    ckpt = torch.load(trained.checkpoint, weights_only=True)
    torch.manual_seed(0)  # the trainer's order: student, then the random teacher
    student = torchvision.models.resnet18(num_classes=7)
    teacher = torchvision.models.vit_b_16(image_size=64, num_classes=7).eval()
    student.load_state_dict(ckpt["model"])
    student.eval()
    val = torchvision.datasets.ImageFolder(os.path.join(trained.data, "val"), transform=ClassificationPresetEval(64, 64))
    images = torch.stack([image for image, _ in val])
    with torch.no_grad():
        f_t = teacher_forward(teacher, images)["f_T"].flatten(0, 1).double()
        tokens = student_forward(student, images, 4)[0].flatten(2).transpose(1, 2)
        projectors = ckpt["projectors"]
        h_s = group_projector(tokens, list(projectors["gl_proj.weight"]), list(projectors["gl_proj.bias"]), 4, 4)
    x = torch.cat([tokens.flatten(0, 1), torch.ones(len(f_t), 1)], dim=1).double()
    direct = x @ torch.linalg.lstsq(x, f_t).solution
    cosine = torch.nn.functional.cosine_similarity
    assert got["cakd"] == pytest.approx(cosine(h_s.flatten(0, 1).double(), f_t, dim=-1).mean().item(), abs=1e-4)
    assert got["direct_mapping"] == pytest.approx(cosine(direct, f_t, dim=-1).mean().item(), abs=1e-4)
    assert got["direct_mapping"] > got["cakd"]  # 336 tokens, 257 inputs: a map fitted on them is close to exact


# ----------------------------------------------------------------------------------------------
# summarize.py
# ----------------------------------------------------------------------------------------------
def synthesized_run(folder, recipe, epochs, records):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"recipe: {recipe}\nepochs: {epochs}\nmodel: resnet50\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return folder


def test_summarize_groups_runs_that_differ_only_in_seed(tmp_path, capsys):
    """Three seeds of one setting make one row, mean ± sample std and n; a run of another
    setting (another lr) stays a row of its own."""
    def run(name, seed, lr, top1s):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(f"recipe: kd\nepochs: 2\nmodel: resnet18\nteacher: vit_b_16\nlr: {lr}\n"
                                            f"seed: {seed}\noutput_dir: {folder}\n")
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "acc1": v, "acc5": 90.0 + e})
                                                      + "\n" for e, v in enumerate(top1s)))
        return str(folder)

    seeds = [run("seed_0", 0, 0.1, [50.0, 60.0]), run("seed_1", 1, 0.1, [55.0, 62.0]), run("seed_2", 2, 0.1, [52.0, 67.0])]
    other = run("lr_0.05", 0, 0.05, [40.0, 45.0])
    code, out, err = call("summarize", [*seeds, other], capsys)
    assert code == 0, err
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert len(rows) == 2
    grouped, alone = rows
    assert grouped[0] == f"| {', '.join(seeds)} (n=3, mean ± std)"
    # final top-1 60, 62, 67: mean 63, sample std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) = 3.61
    assert grouped[4] == "63.00 ± 3.61 / 63.00 ± 3.61" and grouped[5] == "91.00 ± 0.00 / 91.00 ± 0.00"
    assert alone[0] == f"| {other}" and alone[4] == "45.00 / 45.00"


# The paper's Tables 2 and 1, Transformer -> CNN blocks, as paper.md ("The comparison columns") writes them
PAPER_TABLE2 = """
| ViT-B/16 -> ResNet-50 | 77.02/93.40 | 77.27/93.50 | 77.39/93.55 | 78.34/94.06 |
| ViT-L/16 -> ResNet-50 | 77.45/93.57 | 77.82/93.75 | 77.75/93.71 | 78.85/94.31 |
| ViT-B/16 -> ResNet50x2 | 79.02/94.62 | 79.68/94.82 | 79.60/94.79 | 80.72/95.38 |
| ViT-L/16 -> ResNet50x2 | 79.31/94.72 | 79.78/94.85 | 79.83/94.88 | 81.01/95.46 |
| Swin-L -> ResNet-50 | 77.60/93.64 | 77.85/93.76 | 77.89/93.79 | 78.96/94.42 |
| Swin-L -> ResNet50x2 | 79.68/94.83 | 79.92/94.92 | 80.10/94.99 | 81.39/95.64 |
"""
PAPER_TABLE1 = """
| ViT-B/16 -> ResNet-50 | 86.42 | 86.13 | 86.59 | 87.39 |
| ViT-L/16 -> ResNet-50 | 86.69 | 86.73 | 86.91 | 88.09 |
| ViT-B/16 -> ResNet50x2 | 88.86 | 89.11 | 89.38 | 90.33 |
| ViT-L/16 -> ResNet50x2 | 89.28 | 89.51 | 89.68 | 90.97 |
| Swin-L -> ResNet-50 | 86.78 | 86.91 | 87.06 | 88.46 |
| Swin-L -> ResNet50x2 | 88.93 | 90.02 | 89.97 | 91.21 |
"""
PAPER_NAMES = {"ViT-B/16": "vit_b_16", "ViT-L/16": "vit_l_16", "Swin-L": "swin_l", "ResNet-50": "resnet50",
               "ResNet50x2": "resnet50x2"}


def paper_cells(text):
    """(student, teacher, recipe, top-1, top-5) of each cell of a table; the columns are Logits
    (Hinton KD: recipe kd), RKD, IRG and the paper's CAKD."""
    for line in text.strip().splitlines():
        pair, *cells = [c.strip() for c in line.strip("|").split("|")]
        teacher, student = (PAPER_NAMES[n] for n in pair.split(" -> "))
        for recipe, cell in zip(("kd", "rkd", "irg", "cakd"), cells):
            top1, top5 = (cell.split("/") + [None])[:2]
            yield student, teacher, recipe, float(top1), top5 and float(top5)


def test_published_knows_every_cell_of_tables_1_and_2():
    """Every cell of the two tables' Transformer -> CNN blocks, the students alone and the
    CIFAR teachers (paper.md), looked up as summarize.py looks a run up; Figure 3's rows."""
    from cakd.train.published import PAPER, figure3, published

    cells = [("imagenet", *c) for c in paper_cells(PAPER_TABLE2)] + [("cifar100", *c) for c in paper_cells(PAPER_TABLE1)]
    assert len(cells) == 48
    for dataset, student, teacher, recipe, top1, top5 in cells:
        assert (PAPER, top1, top5) in published(dataset, recipe, student, teacher), (dataset, recipe, student, teacher)
    alone = {("imagenet", "resnet50"): (76.28, 93.03), ("imagenet", "resnet50x2"): (78.16, 93.91),
             ("cifar100", "resnet50"): (85.02, None), ("cifar100", "resnet50x2"): (88.21, None),
             ("cifar100", "vit_b_16"): (90.92, None), ("cifar100", "vit_l_16"): (92.46, None),
             ("cifar100", "swin_l"): (93.78, None)}
    for (dataset, model), (top1, top5) in alone.items():
        assert (PAPER, top1, top5) in published(dataset, "baseline", model, "vit_b_16")  # a baseline has no teacher
    assert published("imagefolder", "rkd", "resnet50x2", "swin_l") == [(PAPER, 79.92, 94.92)]  # an image folder is ImageNet
    assert published("imagenet", "cakd", "resnet50", "vit_b_16") == [("released README", 76.21, 93.09), (PAPER, 78.34, 94.06)]
    # Figure 3(a): the ResNet50x2 rows as paper.md reads them off the plot
    assert figure3("resnet50x2", "vit_b_16", "C3") == [("C3", 80.25), ("C4 with noise", 79.75)]
    assert figure3("resnet50x2", "vit_l_16", "C6") == [("C6", 81.0), ("C5 with noise", 80.95)]
    assert figure3("resnet50x2", "vit_l_16", "C2") == [("C2", 79.75)] and figure3("resnet50", "swin_l", "C2") == []


def test_summarize_shows_figure_3_beside_an_ablation_run(tmp_path, capsys):
    """A run of configs/ablation_pca.yaml is Figure 3's C3 (C4 with noise), not Table 2's CAKD
    cell; the full paper recipe adds C5; the released recipe stays Table 2's and the README's."""
    from cakd.train.config import load_yaml, get_args_parser

    def run(name, config, student="resnet50x2"):
        folder = tmp_path / name
        folder.mkdir()
        flags = load_yaml(os.path.join(ROOT, "configs", config), get_args_parser())
        (folder / "config.yaml").write_text(json.dumps({**flags, "model": student}))  # JSON is YAML
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "acc1": 50.0, "acc5": 80.0}) + "\n")
        return str(folder)

    runs = [run("c2", "ablation_gl.yaml"), run("c3", "ablation_pca.yaml"), run("c6", "cakd_paper.yaml"),
            run("released", "cakd.yaml", "resnet50"), run("c1", "kd.yaml")]
    code, out, err = call("summarize", runs, capsys)
    assert code == 0, err
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-1] for line in out.splitlines() if line.startswith("| ")}
    assert rows[runs[0]] == "paper Figure 3 C2 79.30 / – |"
    assert rows[runs[1]] == "paper Figure 3 C3 80.25 / –; paper Figure 3 C4 with noise 79.75 / – |"
    assert rows[runs[2]] == "paper 80.72 / 95.38; paper Figure 3 C5 with noise 80.70 / – |"
    assert rows[runs[3]] == "released README 76.21 / 93.09; paper 78.34 / 94.06 |"
    assert rows[runs[4]] == "paper 79.02 / 94.62 |"


def test_experiment_scripts_run_once_per_seed(tmp_path):
    """SEEDS="0 1 2": the script runs three times, each with --seed N into OUTPUT_DIR/seed_N;
    --output-dir with SEEDS is refused (every seed would write the same folder)."""
    script = tmp_path / "run_stub.sh"
    script.write_text(f'OUTPUT_DIR=${{OUTPUT_DIR:-runs/stub}}\n. "{ROOT}/experiments/seeds.sh"\n'
                      'echo "run into $OUTPUT_DIR with $*"\n')
    env = {**os.environ, "SEEDS": "0 1 2", "OUTPUT_DIR": "runs/x"}
    result = subprocess.run(["sh", str(script), "--lr", "0.1"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"run into runs/x/seed_{s} with --lr 0.1 --seed {s}" for s in (0, 1, 2)]
    result = subprocess.run(["sh", str(script), "--output-dir", "y"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "not --output-dir" in result.stderr and not result.stdout
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, env={**env, "SEEDS": ""}, timeout=60)
    assert result.stdout.splitlines() == ["run into runs/x with "]
    for name in ("baseline", "logits", "kd", "rkd", "irg", "cakd", "cakd_paper"):  # every launch script takes SEEDS
        assert '. "$(dirname "$0")/seeds.sh"' in open(os.path.join(ROOT, "experiments", f"run_{name}.sh")).read()


def test_summarize_table_and_plot(trained, tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    baseline = synthesized_run(str(tmp_path / "baseline"), "baseline", 90, [
        {"epoch": 0, "acc1": 10.5, "acc5": 30.25},
        {"epoch": 1, "acc1": 41.75, "acc5": 70.5},
        {"epoch": 1, "acc1": 40.0, "acc5": 71.0},  # epoch 1 again (resumed run): the last line counts
        {"epoch": 2, "acc1": 39.5, "acc5": 72.25},
    ])
    logits = str(tmp_path / "logits")  # TensorBoard only
    writer = SummaryWriter(os.path.join(logits, "tensorboard"))
    for epoch, (a1, a5, e1, e5) in enumerate([(20.25, 50.5, 18.0, 45.75), (35.5, 66.25, 30.5, 60.0)]):
        for name, value in (("acc1", a1), ("acc5", a5), ("ema_acc1", e1), ("ema_acc5", e5)):
            writer.add_scalar("val/" + name, value, epoch)
    writer.close()
    with open(os.path.join(logits, "config.yaml"), "w") as f:
        f.write("recipe: kd\nepochs: 120\n")  # the paper's "Logits" column

    png = tmp_path / "top1.png"
    code, out, err = call("summarize", [baseline, logits, trained.out, "--plot", png, "--plot-size", "500x300"], capsys)
    assert code == 0, err
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows[baseline].split(" | ")[1:] == ["baseline", "resnet50", "3/90", "40.00 / 39.50", "72.25 / 72.25", "–", "–",
                                               "released README 73.82 / 91.97; paper 76.28 / 93.03 |"]
    assert rows[logits].split(" | ")[1:] == ["kd", "resnet50 <- vit_b_16", "2/120", "35.50 / 35.50", "66.25 / 66.25",
                                             "30.50 / 30.50", "60.00 / 60.00", "paper 77.02 / 93.40 |"]
    r = trained.record
    cells = rows[trained.out].split(" | ")[1:]
    assert cells[:4] == ["cakd", "resnet18 <- vit_b_16", "1/1", f"{r['acc1']:.2f} / {r['acc1']:.2f}"]
    assert cells[5] == f"{r['ema_acc1']:.2f} / {r['ema_acc1']:.2f}"
    assert cells[-1] == "– (a 7-class image folder, not ImageNet: no published number applies) |"  # not Table 3's 71.73
    image = decode_png(png)
    assert tuple(image.shape[1:]) == (300, 500) and (image[:3] != 255).any()
    # what the picture says: axes, a legend of run names, each run's published top-1 as a dashed line
    summarize = SCRIPTS["summarize"]
    fig = summarize.plot([summarize.read_run(run) for run in (baseline, logits, trained.out)], 500, 300)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "top-1 accuracy (%)")
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    name = os.path.basename(trained.out)  # runs are labelled by their folder names; the 7-class run has no published line
    assert legend == ["baseline", "baseline: paper 76.28", "logits", "logits (EMA)", "logits: paper 77.02", name, f"{name} (EMA)"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == [76.28, 77.02]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 > ax.get_window_extent().x1  # beside the axes, off the curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plots] extra were not installed
    code, out, err = call("summarize", [baseline, "--plot", png], capsys)
    assert code == 1 and err == ['error: this picture needs matplotlib, an optional extra: pip install -e ".[plots]" (or pip install matplotlib)']

    code, out, err = call("summarize", [str(tmp_path / "nowhere")], capsys)
    assert code == 1 and len(err) == 1 and "nowhere does not exist" in err[0]


def test_the_readmes_python_api_block_runs(tmp_path, monkeypatch):
    """The README's Python API block, as written but for its sizes: 64 for 224, ResNet-18 for
    ResNet-50, a random teacher for the download. It trains one step and exports the student."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## Python API\n```python\n", 1)[1].split("```", 1)[0]
    small = block.replace("224", "64").replace("resnet50", "resnet18").replace('"IMAGENET1K_V1"', '"none"')
    assert small.count("64") >= 3 and "resnet18" in small and '"none"' in small
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(small, "README.md: Python API", "exec"), scope)
    before = scope["student"].fc.weight.detach().clone()
    student = torchvision.models.resnet18()
    student.load_state_dict(torch.load(tmp_path / "resnet18_cakd.pth", weights_only=True))  # strict
    assert set(scope["losses"]) == {"cls", "pca", "gl", "adv", "disc", "total"}
    assert torch.equal(student.fc.weight, before)  # the exported student is the trained one
    assert scope["student_optimizer"].state and scope["disc_optimizer"].state  # both stepped (momentum kept)


def test_benchmark_profile_on_a_cpu_and_the_loader_alone():
    """--profile on a CPU prints none of the profiler's own log lines (its "ERROR: ...
    gpuGetDeviceCount failed"); a loader-only run's header names no model it never ran."""
    bench = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--device", "cpu", "--batch-size", "2",
             "--image-size", "64", "--num-classes", "10", "--steps", "1", "--warmup", "1"]
    result = subprocess.run(bench + ["--student", "resnet18", "--teacher", "vit_b_32", "--modes", "ideal", "cakd", "--profile",
                                     "--profile-steps", "1"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0 and "| sum of the parts |" in result.stdout, result.stderr[-2000:]
    assert "ERROR" not in result.stderr and "gpuGetDeviceCount" not in result.stderr, result.stderr[-2000:]
    result = subprocess.run(bench + ["--modes", "--loader-workers", "0", "--loader-batches", "1"], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[0]
    assert header.startswith("# loader only: the cakd training preset at 64px, batch 2, generated 400x400 JPEGs, CPU (")
    assert "resnet50" not in result.stdout and "vit_b_16" not in result.stdout
