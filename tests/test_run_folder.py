"""Nothing run, nothing lost, nothing silently wrong (issue 20): hostile files, the run folder's
lock, resumes that change flags, diverged states, disk full, Ctrl-C. Tiny in-process runs."""
import errno
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from cakd.train import main
from cakd.train.rundir import Lock
from make_image_folder import make_image_folder
from test_train import RANDOM_TEACHER, ROOT, assert_same_state, run_main, small_flags

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


class Payload:
    """A pickle that runs ``touch MARKER`` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_file(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f, protocol=2)  # torch.save's protocol
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=8, val_per_class=3, size=72)


@pytest.mark.parametrize("flag", ["--weights", "--teacher-weights"])
def test_hostile_weights_are_one_line_and_do_not_run(flag, data, tmp_path, capsys):
    marker = tmp_path / "ran"
    weights = hostile_file(str(tmp_path / "w.pth"), marker)
    code, err = run_main(small_flags("cakd", data, str(tmp_path / "out"), epochs=1) + [flag, weights], capsys)
    assert code == 1 and len(err) == 1, err
    assert f"weights file {weights} cannot be read (it holds objects other than tensors" in err[0] and "posix.system" in err[0]
    assert "weights_only" not in err[0] and not marker.exists()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 1-epoch cakd run folder (checkpoint.pth, model_0.pth, config.yaml, metrics.jsonl)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    assert main(small_flags("cakd", data, out, epochs=1)) == 0
    return out


def copy_of(folder, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(folder, out)
    return out


def contents(folder):
    """Every file under ``folder`` (the lock aside) with its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name != ".lock":
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def state_of(stat):
    """The state letter in a ``/proc/.../stat`` file (after the name, which may hold ")"), or
    None when that process or thread has ended."""
    try:
        with open(stat) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def frozen(pid):
    """Wait until every thread of process ``pid`` is stopped (SIGSTOP): it writes nothing more."""
    while True:
        states = [state_of(f"/proc/{pid}/task/{task}/stat") for task in os.listdir(f"/proc/{pid}/task")]
        if all(state is None or state in "tTZX" for state in states):  # stopped (or gone)
            return
        time.sleep(0.01)


def gone(pid):
    """Whether process ``pid`` has ended (a zombie counts)."""
    return state_of(f"/proc/{pid}/stat") in (None, "Z", "X")


def test_a_second_run_into_a_folder_in_use_is_refused(data, tmp_path, capsys):
    """A requeued job while the old one still runs: the second trainer says who holds the folder
    and writes nothing; the first goes on (and here saves on SIGTERM). The first is frozen
    (SIGSTOP) while the second tries, so the folder compared is one that only the second could change."""
    out = str(tmp_path / "run")
    flags = small_flags("cakd", data, out, epochs=3)
    proc = subprocess.Popen([sys.executable, "-m", "cakd.train", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=ROOT, start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if "Epoch: [0] [1/6]" in line:
            os.killpg(proc.pid, signal.SIGSTOP)
            frozen(proc.pid)
            before, holder = contents(out), open(os.path.join(out, ".lock"), "rb").read()
            code, err = run_main(flags + ["--resume", "auto"], capsys)
            assert contents(out) == before and open(os.path.join(out, ".lock"), "rb").read() == holder
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(output) + rest
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {out} is in use by another run (pid {proc.pid} on {socket.gethostname()}, since ")
    assert err[0].endswith("): wait for it to end, or give this run another --output-dir")
    Lock(out).release()  # the lock went with the process: free for the next run


def test_a_fresh_start_over_a_checkpoint_is_refused_and_start_over_moves_it_aside(data, trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    before = contents(out)
    code, err = run_main(small_flags("cakd", data, out, epochs=1), capsys)
    assert code == 1 and err == [
        f"error: {out}/checkpoint.pth exists and this run starts fresh: resume it with --resume auto, give this run another "
        "--output-dir, or pass --start-over to move that run's files aside into a previous-<time>/ folder"
    ]
    assert contents(out) == before
    with open(os.path.join(out, ".tmp-k3x9_q2a.pth"), "wb") as f:  # a save cut short by a kill (the name mkstemp gives)
        f.write(b"half a checkpoint")
    assert main(small_flags("cakd", data, out, epochs=1) + ["--start-over"]) == 0
    aside = [name for name in os.listdir(out) if name.startswith("previous-")]
    assert len(aside) == 1 and contents(os.path.join(out, aside[0])) == {k: v for k, v in before.items() if not k.startswith(".tmp")}
    assert not any(name.startswith(".tmp") for name in os.listdir(out))
    assert "start_over" not in yaml.safe_load(open(os.path.join(out, "config.yaml")))  # a rerun with --config does not start over
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


def crafted(trained, tmp_path, **changes):
    """A copy of the trained run's checkpoint with some entries changed (``args``: merged)."""
    ckpt = torch.load(os.path.join(trained, "checkpoint.pth"), weights_only=True)
    ckpt["args"].update(changes.pop("args", {}))
    ckpt.update(changes)
    path = str(tmp_path / "crafted.pth")
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change, shown", [
    (["--lr", "0.05"], "--lr 0.01, not 0.05"),  # the optimizer's
    (["--wd", "0.001"], "--weight-decay 2e-05, not 0.001"),
    (["--opt", "adamw"], "--opt sgd, not adamw"),
    (["--lr-scheduler", "cosineannealinglr"], "--lr-scheduler steplr, not cosineannealinglr"),  # the scheduler's
    (["--lr-gamma", "0.5"], "--lr-gamma 0.1, not 0.5"),
    (["--seed", "1"], "--seed 0, not 1"),
    (["--auto-augment", "ra"], "--auto-augment ta_wide, not ra"),  # the data pipeline
    (["--mixup-alpha", "0.5"], "--mixup-alpha 0.2, not 0.5"),
    (["--model", "resnet34"], "--model resnet18, not resnet34"),  # the recipe and its models
    (["--lambda-start", "5"], "--lambda-start -1.0, not 5.0"),  # the distiller's switches and weights
    (["--use-token", "false"], "--use-token True, not False"),
    (["--feature-weight", "2"], "--feature-weight 0.05, not 2.0"),
    (["--amp"], "--amp False, not True"),
])
def test_a_resume_that_changes_the_training_is_refused_before_writing(change, shown, data, trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    before = contents(out)
    code, err = run_main(small_flags("cakd", data, out, epochs=2) + ["--resume", "auto", *change], capsys)
    assert code == 1 and err == [
        f"error: {out}/checkpoint.pth was trained with {shown}: a resume goes on with the flags of the run it resumes; "
        f"resume with {shown.split(',')[0]} (the run's config.yaml holds them all), or start a new run in another --output-dir"
    ]
    assert contents(out) == before  # config.yaml, metrics.jsonl, tensorboard/ as they were


def test_the_process_count_or_batch_may_change_at_an_epoch_end_only(data, trained, tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = small_flags("cakd", data, out, epochs=2)
    mid_epoch = crafted(trained, tmp_path, step=2, args={"world_size": 2})
    code, err = run_main(flags + ["--resume", mid_epoch], capsys)
    assert code == 1 and err == [
        f"error: {mid_epoch} was saved mid-epoch (step 2) with the process count (torchrun --nproc_per_node x --nnodes) 2, "
        "not 1: resume it with the process count (torchrun --nproc_per_node x --nnodes) 2 (it may change when a run "
        "resumes from an epoch's end)"
    ]
    mid_epoch = crafted(trained, tmp_path, step=2)
    code, err = run_main(flags + ["--resume", mid_epoch, "--batch-size", "2"], capsys)
    assert code == 1 and len(err) == 1 and "saved mid-epoch (step 2) with --batch-size 4, not 2: resume it with" in err[0]
    assert not os.path.exists(out) or contents(out) == {}

    # at an epoch's end: 2 processes of 4 images -> 1 of 2, and 2 epochs where 1 was asked: both apply as written
    epoch_end = crafted(trained, tmp_path, args={"world_size": 2})
    assert main(flags + ["--resume", epoch_end, "--batch-size", "2", "--workers", "1", "--print-freq", "3"]) == 0
    config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    final = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert (config["world_size"], config["batch_size"], config["epochs"]) == (1, 2, 2)
    assert final["args"] == config and final["epoch"] == 1
    assert "Epoch: [1] [11/12]" in capsys.readouterr().out  # 24 images in batches of 2


def test_a_cosine_schedule_keeps_its_length(data, trained, tmp_path, capsys):
    """Its length is in the checkpoint's scheduler state: --epochs may not change under it."""
    ckpt = crafted(trained, tmp_path, args={"lr_scheduler": "cosineannealinglr"})
    flags = small_flags("cakd", data, str(tmp_path / "run"), epochs=3) + ["--lr-scheduler", "cosineannealinglr"]
    code, err = run_main(flags + ["--resume", ckpt], capsys)
    assert code == 1 and len(err) == 1 and f"{ckpt} was trained with --epochs 1, not 3" in err[0]


def test_a_diverged_state_is_not_saved_over_the_good_checkpoint(data, trained, tmp_path, capsys):
    """Finite loss, non-finite state: an infinite BatchNorm running mean (training uses the batch's
    statistics, so no loss shows it). Then a loss grown past --max-loss-growth."""
    out = copy_of(trained, tmp_path)
    before = contents(out)
    state = torch.load(os.path.join(trained, "checkpoint.pth"), weights_only=True)["model"]
    poisoned = crafted(trained, tmp_path, model={**state, "bn1.running_mean": torch.full_like(state["bn1.running_mean"], float("inf"))})
    code, err = run_main(small_flags("cakd", data, out, epochs=2) + ["--resume", poisoned], capsys)
    assert code == 1 and err == [
        f"error: non-finite values in the model state in epoch 1: not saved, {out}/checkpoint.pth, from before this run, "
        "is kept; --resume auto would replay the same steps and stop here again: start a new run in another --output-dir "
        f"from its weights (--weights {out}/checkpoint.pth) with a lower --lr or with --clip-grad-norm"
    ]
    kept = ("checkpoint.pth", "model_0.pth", "metrics.jsonl")  # and no model_1.pth, no epoch 1 in metrics.jsonl
    assert sorted(os.listdir(out)) == sorted(os.listdir(trained)) and all(contents(out)[k] == before[k] for k in kept)

    code, err = run_main(small_flags("cakd", data, out, epochs=2) + ["--resume", "auto", "--max-loss-growth", "1e-9"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: the training loss diverged: the epoch's mean ")
    assert "times the run's loss scale " in err[0] and "(--max-loss-growth 1e-09) in epoch 1: not saved" in err[0]
    assert err[0].endswith("or resume with a larger --max-loss-growth if the growth is expected")
    assert sorted(os.listdir(out)) == sorted(os.listdir(trained)) and all(contents(out)[k] == before[k] for k in kept)


def test_disk_full_at_the_save_is_one_line_and_loses_nothing(data, tmp_path, capsys, monkeypatch):
    """No space left while model_0.pth is written: one line, no .tmp-* left, no metrics.jsonl line
    for the unsaved epoch, and no checkpoint.pth that would tell --resume auto the run is done
    without its model_0.pth (it is written after); the rerun writes both."""
    import cakd.weights

    out = str(tmp_path / "run")
    real_save = torch.save

    def no_space(obj, f, *args, **kwargs):  # the first save of the run: model_0.pth
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cakd.weights.torch, "save", no_space)
    flags = small_flags("cakd", data, out, epochs=1) + ["--resume", "auto"]
    code, err = run_main(flags, capsys)
    assert code == 1 and err == [
        f"error: could not write {out}/model_0.pth ([Errno 28] No space left on device): make room or fix the permissions "
        f"in {out}, then rerun with --resume auto; no checkpoint was written yet"
    ]
    assert sorted(name for name in os.listdir(out) if name != "tensorboard") == [".lock", "config.yaml"]
    monkeypatch.setattr(cakd.weights.torch, "save", real_save)
    assert main(flags) == 0
    assert {"model_0.pth", "checkpoint.pth", "metrics.jsonl"} <= set(os.listdir(out))


def test_ctrl_c_saves_like_sigterm_and_a_second_stops_at_once(data, tmp_path):
    """Ctrl-C as a terminal sends it, to the trainer and its 2 loader workers: the first saves
    mid-epoch and exits 0, and --resume auto then ends equal in every entry to an uninterrupted
    run; two in a row stop at once with one line (status 130), leaving no checkpoint behind."""
    full, out, twice = str(tmp_path / "full"), str(tmp_path / "out"), str(tmp_path / "twice")
    train = [sys.executable, "-m", "cakd.train"]

    def flags(folder):
        return small_flags("cakd", data, folder, epochs=1) + ["--workers", "2", "--resume", "auto"]

    def interrupted(folder, presses):
        """Held after step 1's line (tests/held_train.py), pressed, each press once the last one's
        handler ran (not one signal the kernel merges with the first), then let go."""
        release = os.path.join(str(tmp_path), f"release-{presses}")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "held_train.py"), *flags(folder)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                                env={**ENV, "HOLD_AFTER": "Epoch: [0] [1/6]", "HOLD_RELEASE": release})
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("held: requested"):
                pressed = int(line.split()[-1])
                if pressed < presses:
                    os.killpg(proc.pid, signal.SIGINT)
                else:
                    open(release, "w").close()
        return proc.wait(timeout=300), "".join(output), proc.stderr.read()

    code, stdout, stderr = interrupted(out, 1)
    assert code == 0 and stderr == RANDOM_TEACHER + "\n", stderr[-3000:]
    step = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]
    assert 1 < step < 6 and f"SIGINT: saved epoch 0 step {step} to {out}/checkpoint.pth" in stdout
    results = [subprocess.run(train + flags(folder), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
               for folder in (out, full)]
    assert [result.returncode for result in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]
    assert f"resumed from {out}/checkpoint.pth: epoch 0, step {step}" in results[0].stdout
    uninterrupted = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=True)
    again = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert again["step"] is None
    assert_same_state(uninterrupted, again, skip={".args.output_dir"})

    code, stdout, stderr = interrupted(twice, 2)
    assert code == 130 and stderr.splitlines() == [
        RANDOM_TEACHER,
        "error: stopped at once by a second Ctrl-C: the run folder keeps its last checkpoint (--resume auto goes on from it)"
    ], stderr[-3000:]
    assert not os.path.exists(os.path.join(twice, "checkpoint.pth"))
