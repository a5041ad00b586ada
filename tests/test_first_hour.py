"""A newcomer's first hour (issue 29): values torch would refuse are refused at parse time, a
failed start leaves the run folder as it was, and the small things a first run shows."""
import os

import pytest
import torch

from cakd.train.config import parse_args


@pytest.mark.parametrize("argv, shown", [
    (["--lr", "-1"], "--lr -1.0: a learning rate cannot be negative; give 0 or more"),
    (["--lr-min", "-0.1"], "--lr-min -0.1: a learning rate cannot be negative; give 0 or more"),
    (["--momentum", "-0.9"], "--momentum -0.9: a momentum cannot be negative; give 0 or more (0.9: the recipes')"),
    (["--wd", "-0.0001"], "--weight-decay -0.0001: a weight decay cannot be negative; give 0 or more"),
    (["--norm-weight-decay", "-1"], "--norm-weight-decay -1.0: a weight decay cannot be negative; give 0 or more, or none for --wd"),
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5: it must be between 0 and 1 (0: none, 0.1: the usual)"),
    (["--label-smoothing", "-0.1"], "--label-smoothing -0.1: it must be between 0 and 1 (0: none, 0.1: the usual)"),
    (["--lr-warmup-decay", "0"], "--lr-warmup-decay 0.0: it must be above 0 and at most 1 (the warmup's first lr over --lr)"),
    (["--random-erase", "2"], "--random-erase 2.0: it is a probability: between 0 and 1"),
    (["--augmix-severity", "11"], "--augmix-severity 11: AugMix's severity is from 1 to 10"),
    (["--ra-magnitude", "31"], "--ra-magnitude 31: RandAugment's magnitude is a bin from 0 to 30"),
    (["--workers", "-1"], "--workers -1: it must be 0 or more (0: load the data in the training process)"),
    (["--opt", "adam"], "--opt adam: not an optimizer: use sgd, sgd_nesterov, rmsprop or adamw"),
    (["--opt", "sgd_nesterov", "--momentum", "0"],
     "--opt sgd_nesterov with --momentum 0: Nesterov momentum needs a momentum above 0; give one, or use --opt sgd"),
])
def test_values_torch_would_refuse_are_one_line_at_parse_time(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: {shown}; see --help"]


@pytest.mark.parametrize("build", [
    lambda p: torch.optim.SGD(p, lr=-1.0),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=-0.9),
    lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=-1e-4),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.0, nesterov=True),
    lambda p: torch.nn.CrossEntropyLoss(label_smoothing=1.5)(torch.zeros(2, 3), torch.tensor([0, 1])),
])
def test_torch_itself_refuses_those_values(build):
    """What the parse-time checks stand in for: torch refuses these once the models are built."""
    with pytest.raises((ValueError, RuntimeError)):
        build([torch.zeros(1, requires_grad=True)])


def test_the_trainer_refuses_a_negative_lr_before_building_anything(tmp_path, capsys):
    from cakd.train import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--lr", "-1", "--device", "cpu", "--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --lr -1.0: a learning rate cannot be negative; give 0 or more; see --help"]
    assert not out.exists()


# ---- a failed start leaves the run folder as it was (29.3, 28.5, 28.7) -------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from make_image_folder import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=4, val_per_class=2, size=64)


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    from make_image_folder import make_image_folder

    return make_image_folder(str(tmp_path_factory.mktemp("four")), num_classes=4, train_per_class=2, val_per_class=1, size=64)


def flags(data, out, recipe="baseline", epochs=1):
    from test_train import small_flags

    return small_flags(recipe, data, out, epochs=epochs) + ["--cache-dataset"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 1-epoch baseline run folder."""
    from cakd.train import main

    out = str(tmp_path_factory.mktemp("trained") / "run")
    assert main(flags(data, out)) == 0
    return out


def snapshot(folder):
    """Every file (the lock too) and folder under ``folder``, files with their bytes; None when
    there is no ``folder``."""
    if not os.path.exists(folder):
        return None
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def user_files(folder):
    """A folder a user already has things in, as ``--output-dir .`` in a clone."""
    os.makedirs(folder)
    for name, text in (("notes.txt", b"mine"), ("draft.tmp", b"an editor's"), (".tmp-mine", b"mine too")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(text)
    return folder


def garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    return path


FAILED_STARTS = {
    "missing data": (lambda d, tmp: ["--data-path", str(tmp / "nowhere")], "nowhere does not exist"),
    "unreadable teacher file": (lambda d, tmp: ["--recipe", "cakd", "--teacher-weights", garbage(str(tmp / "t.pth"))], "t.pth"),
    "crop the teacher refuses": (lambda d, tmp: ["--recipe", "cakd", "--train-crop-size", "72"], "--train-crop-size 72"),
    "unreadable resume file": (lambda d, tmp: ["--resume", garbage(str(tmp / "r.pth"))], "r.pth"),
}


@pytest.mark.parametrize("case", list(FAILED_STARTS))
@pytest.mark.parametrize("folder", ["with user files", "missing"])
def test_a_failed_start_leaves_the_folder_as_it_was(case, folder, data, tmp_path, capsys):
    from test_train import run_main

    out = str(tmp_path / "parent" / "run")
    if folder == "with user files":
        user_files(out)
    before = snapshot(out)
    extra, shown = FAILED_STARTS[case]
    code, err = run_main(flags(data, out) + extra(data, tmp_path), capsys)
    assert code == 1 and len(err) == 1 and shown in err[0], err
    assert snapshot(out) == before  # no .lock, config.yaml, tensorboard/, dataset_cache.json; draft.tmp kept
    assert folder != "missing" or not os.path.exists(str(tmp_path / "parent"))


@pytest.mark.parametrize("extra, shown", [
    (lambda four, tmp: ["--data-path", four], "size mismatch"),  # 4 classes where the checkpoint has 3
    (lambda four, tmp: ["--data-path", str(tmp / "moved")], "moved does not exist"),
])
def test_a_refused_resume_leaves_the_folder_as_it_was(extra, shown, data, four_classes, trained, tmp_path, capsys):
    import shutil

    from test_train import run_main

    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    before = snapshot(out)
    code, err = run_main(flags(data, out) + ["--epochs", "2", "--resume", "auto", *extra(four_classes, tmp_path)], capsys)
    assert code == 1 and len(err) == 1 and shown in err[0], err
    assert snapshot(out) == before  # config.yaml not rewritten, no second TensorBoard file, the lock's line as it was


def test_a_refused_fresh_start_deletes_nothing_and_a_start_removes_only_its_own_leftovers(data, trained, tmp_path, capsys):
    import shutil

    from cakd.train import main
    from test_train import run_main

    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    for name in ("draft.tmp", ".tmp-mine", "config.yaml.tmp"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"not ours")
    with open(os.path.join(out, ".tmp-ab3_x9zq.pth"), "wb") as f:  # a save cut short: the name the atomic writer gives
        f.write(b"half a checkpoint")
    before = snapshot(out)
    code, err = run_main(flags(data, out), capsys)
    assert code == 1 and len(err) == 1 and "checkpoint.pth exists and this run starts fresh" in err[0]
    assert snapshot(out) == before
    assert main(flags(data, out) + ["--epochs", "2", "--resume", "auto"]) == 0
    names = set(os.listdir(out))
    assert {"draft.tmp", ".tmp-mine", "config.yaml.tmp"} <= names and ".tmp-ab3_x9zq.pth" not in names


def test_the_lock_is_taken_on_the_file_at_its_path(tmp_path, monkeypatch):
    """A start that fails removes the lock file it made; a run that opened that file just before
    must not hold a lock on the removed file (a third run would take the new one: two in the
    folder). Here the file goes between the open and the flock: the lock is taken again."""
    from cakd.train import rundir

    path = str(tmp_path / rundir.LOCK_FILE)
    with open(path, "w") as f:
        f.write("pid 1 on elsewhere")
    real_flock, calls = rundir.fcntl.flock, []

    def flock_after_the_file_went(fd, flags):
        calls.append(fd)
        if len(calls) == 1:
            os.remove(path)  # the failed start's release, between this run's open and flock
        return real_flock(fd, flags)

    monkeypatch.setattr(rundir.fcntl, "flock", flock_after_the_file_went)
    held = rundir.Lock(str(tmp_path))
    assert len(calls) == 2 and os.path.samestat(os.fstat(held.fd), os.stat(path)) and held.created
    monkeypatch.setattr(rundir.fcntl, "flock", real_flock)
    with pytest.raises(rundir.UserError, match="is in use by another run"):
        rundir.Lock(str(tmp_path))
    held.release(leave_as_found=True)  # made by this start: removed
    assert not os.path.exists(path)


@pytest.mark.parametrize("script, env", [("run_cifar100.sh", {}), ("run_cakd.sh", {"SEEDS": "0 1"})])
def test_an_experiment_scripts_help_is_the_help_only(script, env, tmp_path):
    """run_cifar100.sh --help: the first step's help, not a "stopped before its last epoch" line
    after it (nor the next steps); with SEEDS, once, not once per seed. Nothing is written."""
    import subprocess
    import sys

    from test_train import ROOT

    env = {**os.environ, **env, "PYTHONPATH": ROOT, "OUTPUT_DIR": str(tmp_path / "runs"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["sh", os.path.join(ROOT, "experiments", script), "--help"], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.count("usage: python -m cakd.train") == 1 and result.stdout.rstrip().endswith(")")
    assert "stopped before" not in result.stdout and not os.path.exists(tmp_path / "runs")


def test_the_launcher_that_gets_the_sigterm_says_so(monkeypatch, capsys):
    """In a two-node run rank 0 (which says what it saved) may be on the other node: the launcher
    that receives the SIGTERM writes a line in its own node's log."""
    import signal
    import socket

    from cakd.train import launch

    started = []
    monkeypatch.setenv(launch.STOP_ENV, "0")  # restored after the test: a later run in this process must not stop
    monkeypatch.setattr(launch.threading, "Thread", lambda **kwargs: started.append(kwargs) or type("T", (), {"start": lambda self: None})())
    launch.on_sigterm(signal.SIGTERM, None)
    launch.on_sigterm(signal.SIGTERM, None)  # a second: passed on already, said once
    assert capsys.readouterr().out.splitlines() == [
        f"SIGTERM to the launcher on {socket.gethostname()}: passed on to this node's ranks, which save and stop"
    ]
    assert len(started) == 1 and started[0]["args"] == (signal.SIGTERM,)


def test_the_header_says_1_epoch_and_rkd_says_when_its_batch_is_too_small():
    """The run's first line: "1 epoch", and for RKD with under 3 images per process a note that its
    relations are empty (loss_rkd logs 0 at every step, which a newcomer would not guess)."""
    from types import SimpleNamespace

    from cakd.distillers import build_distiller
    from cakd.losses import rkd_loss
    from cakd.train.trainer import Run
    from conftest import tiny_vit

    import cakd

    torch.manual_seed(0)
    student, teacher = cakd.build_student("resnet18", num_classes=10), tiny_vit()
    rkd = build_distiller("rkd", student, teacher, image_size=64)

    def header(batch_size, epochs=1):
        args = SimpleNamespace(model="resnet18", teacher="vit_b_16", teacher_weights="none", recipe="rkd", world_size=2,
                               batch_size=batch_size, epochs=epochs)
        return Run.header(SimpleNamespace(args=args, distiller=rkd)).splitlines()

    assert header(3) == ["cakd.train: rkd recipe, resnet18 <- vit_b_16 (none), 2 process(es) x 3 images = 6 per step, 1 epoch"]
    assert header(3, epochs=2)[0].endswith("6 per step, 2 epochs")
    assert header(2)[1:] == [
        "  note: 2 image(s) per process: RKD's angle term has no triplet and its distance term no two distances to compare, "
        "so loss_rkd is 0 at every step; use --batch-size 3 or more"
    ]
    # what the note says: a batch of two gives 0 whatever the embeddings
    assert rkd_loss(torch.randn(2, 8), torch.randn(2, 5)).item() == 0.0
    assert rkd_loss(torch.randn(3, 8), torch.randn(3, 5)).item() > 0.0


def test_the_random_teacher_warning_goes_to_stderr(data, tmp_path, capsys):
    from cakd.train import main
    from test_train import RANDOM_TEACHER, small_flags

    assert main(small_flags("cakd", data, str(tmp_path / "out"), epochs=1) + ["--iters-per-epoch", "1"]) == 0
    captured = capsys.readouterr()
    assert RANDOM_TEACHER in captured.err.splitlines() and "warning" not in captured.out
    assert "4 images = 4 per step, 1 epoch\n" in captured.out


def test_a_plot_of_one_epoch_runs_has_whole_epoch_ticks_and_points_side_by_side(tmp_path):
    """summarize.py --plot of three one-epoch runs (two with the same top-1, each with its EMA):
    the x axis shows epoch 0 (not ticks from -0.04 to 0.04), and no two markers sit on each other."""
    from test_scripts import SCRIPTS, synthesized_run

    summarize = SCRIPTS["summarize"]
    runs = [synthesized_run(str(tmp_path / name), "baseline", 1, [{"epoch": 0, "acc1": top1, "ema_acc1": top1}])
            for name, top1 in (("a", 33.0), ("b", 33.0), ("c", 50.0))]
    fig = summarize.plot([summarize.read_run(run) for run in runs], 500, 300)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert list(ax.get_xticks()) == [0] and ax.get_xlim() == (-0.5, 0.5)
    markers = [(x, y) for line in ax.get_lines() if line.get_linestyle() != "--" for x, y in line.get_xydata().tolist()]
    assert len(markers) == 6 and len(set(markers)) == 6 and all(-0.5 < x < 0.5 for x, _ in markers)
    # a longer run keeps its own axis and points
    longer = synthesized_run(str(tmp_path / "d"), "baseline", 5, [{"epoch": e, "acc1": 10.0 * e} for e in range(5)])
    fig = summarize.plot([summarize.read_run(longer)], 500, 300)
    assert fig.axes[0].get_lines()[0].get_xydata()[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_start_over_with_resume_auto_starts_afresh(data, trained, tmp_path, capsys):
    """The folder is claimed before the resume is looked up now: --start-over --resume auto (a
    requeued script that also asks to start over) must not resume the run it moves aside."""
    import shutil

    from cakd.train import main

    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    assert main(flags(data, out) + ["--start-over", "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" not in printed and "--start-over: the previous run's files are in" in printed
    aside = [name for name in os.listdir(out) if name.startswith("previous-")]
    assert len(aside) == 1 and os.path.isfile(os.path.join(out, aside[0], "checkpoint.pth"))
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1
