"""The trainer end to end: torchrun with 2 CPU processes (gloo) for each recipe, exact
resume, and bad input that ends with one clear line and loses nothing."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from make_image_folder import make_image_folder
from cakd.train import main
from cakd.train.checkpoints import finished

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=8, val_per_class=3, size=72)


RANDOM_TEACHER = "warning: --teacher-weights none: a random teacher, for smoke runs only"  # on stderr, once a run


def small_flags(recipe, data, out, epochs=2):
    flags = ["--config", os.path.join(ROOT, "configs", f"{recipe}.yaml"), "--device", "cpu", "--data-path", data,
             "--output-dir", out, "--model", "resnet18", "--teacher-weights", "none", "--train-crop-size", "64",
             "--val-resize-size", "64", "--val-crop-size", "64", "--batch-size", "4", "--workers", "0",
             "--epochs", str(epochs), "--print-freq", "1", "--checkpoint-freq", "1", "--lr", "0.01",
             "--model-ema-steps", "1", "--lr-warmup-epochs", "0"]
    if recipe == "cakd":
        flags += ["--lambda-start", "-1", "--lambda-span", "1"]  # distillation on from the first step
    return flags


def torchrun(flags, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cakd.train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_same_state(a, b, path="", skip=()):
    """Every entry equal: tensors (dtype, shape, values), and the scalars, strings and Nones
    around them (scheduler last_epoch and lr, EMA n_averaged, scaler, RNG states, epoch, step)."""
    if path in skip:
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}", skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]", skip)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("recipe", ["baseline", "logits", "cakd"])
def test_torchrun_two_processes_and_exact_resume(recipe, data_dir, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    result = torchrun(small_flags(recipe, data_dir, full))
    assert "Epoch: [1]" in result.stdout and "Acc@1" in result.stdout and "2 process(es)" in result.stdout
    torchrun(small_flags(recipe, data_dir, resumed) + ["--resume", os.path.join(full, "model_0.pth")])

    uninterrupted = torch.load(os.path.join(full, "model_1.pth"), weights_only=True)
    again = torch.load(os.path.join(resumed, "checkpoint.pth"), weights_only=True)
    assert uninterrupted["epoch"] == again["epoch"] == 1
    assert_same_state(uninterrupted, again, skip={".args.output_dir"})  # every entry, the folder aside
    first = torch.load(os.path.join(full, "model_0.pth"), weights_only=True)
    assert any(not torch.equal(first["model"][k], uninterrupted["model"][k]) for k in first["model"])  # it trained
    assert len(again["rng"]) == 2  # one RNG state per rank
    if recipe == "cakd":
        assert uninterrupted["discriminator"] is not None and uninterrupted["projectors"]
    assert os.path.isfile(os.path.join(full, "config.yaml")) and os.listdir(os.path.join(full, "tensorboard"))


def run_main(flags, capsys):
    """``main(flags)``: its status and stderr lines, the random teacher's warning of smoke runs aside."""
    code = main(flags)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line != RANDOM_TEACHER]
    return code, err


def test_missing_data_path(tmp_path, capsys):
    code, err = run_main(small_flags("baseline", str(tmp_path / "nowhere"), str(tmp_path / "out")), capsys)
    assert code == 1 and len(err) == 1 and "nowhere does not exist" in err[0]


def test_folder_without_train_and_val(tmp_path, capsys):
    (tmp_path / "data" / "images").mkdir(parents=True)
    code, err = run_main(small_flags("baseline", str(tmp_path / "data"), str(tmp_path / "out")), capsys)
    assert code == 1 and len(err) == 1 and "has no train/ folder" in err[0]


def test_unreadable_image_keeps_the_last_checkpoint(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=4, val_per_class=2, size=72)
    out = str(tmp_path / "out")
    assert run_main(small_flags("baseline", data, out, epochs=1), capsys)[0] == 0
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    bad = os.path.join(data, "train", "class_0", "broken.JPEG")
    with open(bad, "wb") as f:
        f.write(b"not an image at all")
    flags = small_flags("baseline", data, out, epochs=2) + ["--resume", os.path.join(out, "checkpoint.pth"), "--workers", "1"]
    code, err = run_main(flags, capsys)
    assert code == 1 and err[-1].startswith("error: cannot read image") and "broken.JPEG" in err[-1]
    assert sum(line.startswith("error") for line in err) == 1
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before


def test_a_validation_file_that_is_no_image_stops_the_run_before_the_first_epoch(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, train_per_class=2, val_per_class=2, size=72)
    bad = os.path.join(data, "val", "class_1", "broken.JPEG")
    with open(bad, "wb") as f:
        f.write(b"not an image at all")
    out = str(tmp_path / "out")
    code = main(small_flags("baseline", data, out, epochs=1))
    captured = capsys.readouterr()
    assert code == 1 and captured.err.strip().splitlines() == [f"error: cannot read image {bad} (UnidentifiedImageError: "
                                                               f"cannot identify image file '{bad}'): remove or replace the file"]
    assert "Epoch:" not in captured.out and not os.path.exists(os.path.join(out, "checkpoint.pth"))


def test_resume_from_a_corrupt_or_missing_file(tmp_path, capsys, data_dir):
    corrupt = tmp_path / "checkpoint.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    code, err = run_main(small_flags("baseline", data_dir, str(tmp_path / "out")) + ["--resume", str(corrupt)], capsys)
    assert code == 1 and len(err) == 1 and "is corrupt or truncated" in err[0]
    with pytest.raises(Exception) as reason:
        torch.load(corrupt, weights_only=True)
    first_line = str(reason.value).strip().splitlines()[0]
    assert f"({type(reason.value).__name__}: {first_line}): it is corrupt" in err[0]  # torch's reason whole, not cut
    code, err = run_main(small_flags("baseline", data_dir, str(tmp_path / "out")) + ["--resume", str(tmp_path / "no.pth")], capsys)
    assert code == 1 and len(err) == 1 and "no.pth does not exist" in err[0]


def test_resume_with_other_distiller_flags_is_one_clear_error(tmp_path, capsys, data_dir):
    out = str(tmp_path / "out")
    assert run_main(small_flags("cakd", data_dir, out, epochs=1), capsys)[0] == 0
    flags = small_flags("cakd", data_dir, out, epochs=2) + ["--resume", os.path.join(out, "checkpoint.pth"), "--use-token", "false"]
    code, err = run_main(flags, capsys)
    assert code == 1 and err == [
        f"error: {out}/checkpoint.pth was trained with --use-token True, not False: a resume goes on with the flags of the "
        "run it resumes; resume with --use-token True (the run's config.yaml holds them all), or start a new run in another "
        "--output-dir"
    ]


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys, data_dir):
    out = str(tmp_path / "out")
    assert run_main(small_flags("cakd", data_dir, out, epochs=1), capsys)[0] == 0
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    # an infinite weight in a copy of the checkpoint makes the very next loss non-finite
    poisoned = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    poisoned["model"]["conv1.weight"].fill_(float("inf"))
    torch.save(poisoned, str(tmp_path / "poisoned.pth"))
    flags = small_flags("cakd", data_dir, out, epochs=3) + ["--resume", str(tmp_path / "poisoned.pth")]
    code, err = run_main(flags, capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss in epoch 1" in err[0]
    assert f"{out}/checkpoint.pth, from before this run, is kept" in err[0]
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before
    fresh = str(tmp_path / "fresh")
    code, err = run_main(small_flags("cakd", data_dir, fresh, epochs=1) + ["--feature-weight", "inf"], capsys)
    assert code == 1 and len(err) == 1 and "non-finite loss in epoch 0" in err[0] and "no checkpoint was written yet" in err[0]
    assert not os.path.exists(os.path.join(fresh, "checkpoint.pth"))


def test_a_parameter_that_can_never_learn_is_refused_at_start(tmp_path, capsys, data_dir):
    """use_cls and use_logits off: nothing reads the classifier, which DDP would fail on a step later."""
    out = str(tmp_path / "out")
    code, err = run_main(small_flags("cakd", data_dir, out, epochs=1) + ["--use-cls", "false", "--use-logits", "false"], capsys)
    assert code == 1 and err == [
        "error: with these loss switches student.fc.weight, student.fc.bias never get a gradient: turn on a loss term "
        "that uses them (use_cls or use_logits for the classifier, use_token for the token projector)"
    ]
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


def test_sigterm_without_workers_resumes_exactly(data_dir, tmp_path):
    """One process (no torchrun), --workers 0, SIGTERM to its process group mid-epoch: it saves and
    exits 0, and the resumed run ends equal in every entry to an uninterrupted run with --workers 2
    (each sample's augmentation and each batch's MixUp have their own seed, not a worker's RNG)."""
    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    train = [sys.executable, "-m", "cakd.train"]
    result = subprocess.run(train + small_flags("cakd", data_dir, full, epochs=1) + ["--workers", "2"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    flags = small_flags("cakd", data_dir, out, epochs=1)
    release = str(tmp_path / "release")  # held after step 1's line until the SIGTERM's handler ran (tests/held_train.py)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "held_train.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
                            env={**env, "HOLD_AFTER": "Epoch: [0] [1/6]", "HOLD_RELEASE": release})
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("held: requested False"):
            os.killpg(proc.pid, signal.SIGTERM)
        elif line.startswith("held: requested True"):
            open(release, "w").close()
    assert proc.wait(timeout=300) == 0, "".join(output)[-3000:]
    step = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]
    assert 1 < step < 6 and f"SIGTERM: saved epoch 0 step {step}" in "".join(output)
    assert not finished(os.path.join(out, "checkpoint.pth"))  # what run_cifar100.sh asks before its next step
    resumed = subprocess.run(train + flags + ["--resume", os.path.join(out, "checkpoint.pth")], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoint.pth: epoch 0, step {step}" in resumed.stdout
    uninterrupted = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=True)
    again = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert again["step"] is None and finished(os.path.join(out, "checkpoint.pth"))
    assert_same_state(uninterrupted, again, skip={".args.output_dir", ".args.workers"})


def tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_bf16_autocast_channels_last_run_logs_every_term(tmp_path, capsys, data_dir):
    """A CPU run with bf16 autocast and channels_last trains, evaluates, and writes every
    TensorBoard scalar the issue names; --test-only then re-evaluates the checkpoint alike."""
    out = str(tmp_path / "out")
    flags = small_flags("cakd", data_dir, out, epochs=1) + ["--amp", "--amp-dtype", "bfloat16", "--channels-last"]
    code, err = run_main(flags, capsys)
    assert code == 0, err
    tags = tensorboard_tags(os.path.join(out, "tensorboard"))
    for term in ("loss", "loss_cls", "loss_pca", "loss_gl", "loss_adv", "loss_disc", "lambda", "lr", "disc_lr", "img_per_s"):
        assert f"train/{term}" in tags, term
    for metric in ("acc1", "acc5", "ema_acc1", "ema_acc5"):
        assert f"val/{metric}" in tags, metric
    import json

    record = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert record["epoch"] == 0 and 0 <= record["acc1"] <= 100 and record["train_loss_pca"] > 0

    assert main(flags + ["--test-only", "--resume", os.path.join(out, "checkpoint.pth")]) == 0
    assert "Test: EMA Acc@1" in capsys.readouterr().out
    lines = [line for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == 1  # test-only writes no metrics and no checkpoint


def test_test_only_agrees_with_training_evaluation(tmp_path, capsys, data_dir):
    out = str(tmp_path / "out")
    flags = small_flags("logits", data_dir, out, epochs=1)
    assert main(flags) == 0
    trained = capsys.readouterr().out
    import json

    record = json.loads(open(os.path.join(out, "metrics.jsonl")).read())
    code = main(flags + ["--test-only", "--resume", os.path.join(out, "checkpoint.pth")])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"Test: Acc@1 {record['acc1']:.3f} Acc@5 {record['acc5']:.3f}" in printed
    assert f"Test: EMA Acc@1 {record['ema_acc1']:.3f}" in printed
    assert "Epoch: [" not in printed and "Epoch: [0]" in trained
    assert "cakd.train: logits recipe" in trained and "cakd.train:" not in printed  # no training banner
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    assert main(flags + ["--resume", "auto"]) == 0  # the same run again: it is finished
    again = capsys.readouterr().out
    assert f"{out}/checkpoint.pth is a finished run: all 1 epoch trained; nothing to do" in again
    assert "Start training" not in again and open(os.path.join(out, "checkpoint.pth"), "rb").read() == before


def test_quickstart_script(tmp_path):
    """The README's first command: a CAKD run on a generated folder, on the CPU."""
    env = {**os.environ, "OUT": str(tmp_path / "qs"), "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["sh", os.path.join(ROOT, "scripts", "quickstart.sh"), "--epochs", "1"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch: [0] Total time" in result.stdout and "Test: EMA Acc@1" in result.stdout
    for name in ("checkpoint.pth", "config.yaml", "metrics.jsonl", "tensorboard"):
        assert os.path.exists(tmp_path / "qs" / name), name
    assert not list((tmp_path / "qs").glob("model_*.pth"))  # no second full copy of the last state


def test_test_only_weights_and_metrics_after_resume(tmp_path, capsys, data_dir):
    """--test-only --weights takes an exported student; resuming into the same folder rewrites
    the epochs it trains again instead of listing them twice in metrics.jsonl."""
    import json

    import cakd

    out = str(tmp_path / "out")
    flags = small_flags("baseline", data_dir, out, epochs=2)
    assert main(flags) == 0
    assert main(flags + ["--resume", os.path.join(out, "model_0.pth")]) == 0
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert epochs == [0, 1]
    capsys.readouterr()
    exported = str(tmp_path / "student.pth")
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    torch.save(ckpt["model"], exported)
    assert main(flags + ["--test-only", "--weights", exported]) == 0
    last = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert f"Test: Acc@1 {last['acc1']:.3f}" in capsys.readouterr().out


def test_fp16_autocast_with_grad_scaler(tmp_path, capsys, data_dir):
    """--amp with float16 steps both optimizers through one GradScaler and checkpoints it."""
    out = str(tmp_path / "out")
    flags = small_flags("cakd", data_dir, out, epochs=1) + ["--amp", "--amp-dtype", "float16"]
    code, err = run_main(flags, capsys)
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
