"""Preemption under torchrun, 2 gloo processes on the CPU, through ``python -m cakd.train.launch``:
SIGTERM wherever it lands saves mid-epoch and every process exits 0; the resumed run (data-loader
workers included) ends with a checkpoint equal in every entry to an uninterrupted run's; a rank
killed under ``--max-restarts 1`` restarts from the last checkpoint; a failure says one line."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cakd.train.launch import children
from make_image_folder import make_image_folder
from test_run_folder import gone
from test_train import RANDOM_TEACHER, ROOT, assert_same_state, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 48 training images: with the RA sampler's small-set fallback, 6 steps of 4 per rank and epoch
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=4, train_per_class=12, val_per_class=2, size=40)


def flags(data, out, workers=2):
    """The released cakd recipe (TrivialAugment, RandomErasing, MixUp, RA sampler, EMA, label
    smoothing, discriminator), tiny: resnet18 <- random vit_b_16 at 32x32, 2 epochs, warmup 1."""
    return ["--config", os.path.join(ROOT, "configs", "cakd.yaml"), "--device", "cpu", "--data-path", data,
            "--output-dir", out, "--model", "resnet18", "--teacher-weights", "none", "--train-crop-size", "32",
            "--val-resize-size", "32", "--val-crop-size", "32", "--batch-size", "4", "--workers", str(workers),
            "--epochs", "2", "--print-freq", "1", "--lr", "0.01", "--model-ema-steps", "1", "--lr-warmup-epochs", "1",
            "--lambda-start", "-1", "--lambda-span", "1", "--resume", "auto"]


def test_an_epoch_replays_from_any_position_with_any_workers(data):
    """The batches of an epoch (TrivialAugment, RandomErasing, MixUp) are a function of (seed, epoch,
    rank, position): workers or not, started mid-epoch or not, they are the same, and drawing them
    leaves the trainer's RNG where it was."""
    from cakd.train.config import parse_args
    from cakd.train.data import build_datasets, build_loaders
    from cakd.train.run import dataset_options, loader_options

    args = parse_args(flags(data, "unused")[:-2])
    train, val, classes = build_datasets(**dataset_options(args))

    def batches(workers, start=0, epoch=1):
        args.workers = workers
        loader = build_loaders(train, val, classes, distributed=False, **loader_options(args))[0]
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = start * args.batch_size
        return list(loader)

    rng = torch.get_rng_state()
    whole = batches(0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(whole) == 12 and whole[0][1].shape == (4, 4) and whole[0][1].dtype == torch.float32  # MixUp: soft targets
    for (a, a_targets), (b, b_targets) in zip(whole[5:], batches(2, start=5)):
        assert torch.equal(a, b) and torch.equal(a_targets, b_targets)
    assert not torch.equal(whole[0][0], batches(0, epoch=2)[0][0])


def launch(args, torchrun_flags=(), held=False, trainer="cakd.train"):
    """The launcher's command line for ``trainer`` (``cakd.train`` or ``cakd.detection``); ``held``:
    the ranks run tests/held_train.py (see :func:`run_held`; ``$HOLD_TRAINER`` names the trainer)."""
    entry = [os.path.join(ROOT, "tests", "held_train.py")] if held else ["-m", trainer]
    return [sys.executable, "-m", "cakd.train.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *torchrun_flags, *entry, *args]


def descendants(pid):
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def run_held(args, after, send, tmp_path, times=1):
    """The launcher with rank 0 held after its progress line holding ``after`` (tests/held_train.py):
    ``send(proc)`` then, each time rank 0's handler has run for the last one (not merely once it was
    sent: two Ctrl-Cs in a row must not merge into one), again, ``times`` in all; then let go.
    The signal lands at a known step, not wherever a live run has got to. Returns as :func:`run`."""
    release = os.path.join(str(tmp_path), "release")
    if os.path.exists(release):
        os.remove(release)

    def act(proc, line):
        if line.startswith("held: requested"):
            requested, interrupts = line.split()[2] == "True,", int(line.split()[-1])
            handled = interrupts or int(requested)
            if handled < times:
                send(proc)
            elif not os.path.exists(release):
                open(release, "w").close()

    return run(launch(args, held=True), "held: requested", act, tmp_path, env={"HOLD_AFTER": after, "HOLD_RELEASE": release},
               every=True)


def run(cmd, marker=None, act=None, tmp_path=None, limit=400, env=None, every=False):
    """Run ``cmd`` in its own session; ``act(proc)`` once a stdout line holds ``marker`` (``every``:
    ``act(proc, line)`` on each such line). Returns (status, stdout, stderr); a run still going after
    ``limit`` seconds is killed, ranks too."""
    err_path = os.path.join(str(tmp_path), "stderr.txt")

    def kill_all():
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**ENV, **(env or {})}, cwd=ROOT,
                                start_new_session=True)
        watchdog = threading.Timer(limit, kill_all)
        watchdog.start()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if marker is not None and marker in line:
                if every:
                    act(proc, line)
                else:
                    act(proc)
                    marker = None
        proc.wait()
        watchdog.cancel()
    return proc.returncode, "".join(lines), open(err_path).read()


def step_of(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    code, stdout, stderr = run(launch(flags(data, out)), tmp_path=out)
    assert code == 0, stderr[-3000:]
    assert f"--resume auto: no {out}/checkpoint.pth yet, starting fresh" in stdout  # auto, fresh
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


def test_sigterm_at_the_launcher_then_at_every_process_saves_and_resumes_exactly(data, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    # 1. at the launcher (torchrun's own process), mid-epoch 0
    code, stdout, stderr = run_held(flags(data, out), "Epoch: [0] [2/", lambda p: p.send_signal(signal.SIGTERM), tmp_path)
    assert code == 0 and stderr == RANDOM_TEACHER + "\n", stderr[-3000:]
    step = step_of(out)
    assert 2 < step < 6 and f"SIGTERM: saved epoch 0 step {step}" in stdout

    # 2. as SLURM does: the launcher's process group and every process under it (ranks, their loader workers)
    signalled = []

    def everyone(proc):
        signalled[:] = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        for pid in signalled:
            os.kill(pid, signal.SIGTERM)

    code, stdout, stderr = run_held(flags(data, out), "Epoch: [1] [2/", everyone, tmp_path)
    assert code == 0 and stderr == RANDOM_TEACHER + "\n", stderr[-3000:]  # no worker "killed by signal", no traceback
    assert len(signalled) >= 2 + 2 * 2  # the ranks and their 2 loader workers each
    assert f"resumed from {out}/checkpoint.pth: epoch 0, step {step}" in stdout  # auto, existing
    step = step_of(out)
    assert 2 < step < 6 and f"SIGTERM: saved epoch 1 step {step}" in stdout

    # 3. to the end: every entry of the checkpoint equals the uninterrupted run's
    code, stdout, stderr = run(launch(flags(data, out)), tmp_path=tmp_path)
    assert code == 0 and f"resumed from {out}/checkpoint.pth: epoch 1, step {step}" in stdout, stderr[-3000:]
    final = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert final["epoch"] == 1 and final["step"] is None
    assert_same_state(uninterrupted, final, skip={".args.output_dir"})


def test_ctrl_c_at_the_launcher_saves_a_second_stops_and_the_resume_is_exact(data, uninterrupted, tmp_path):
    """Ctrl-C reaches the launcher alone (torchrun gives each rank a session of its own): the first
    is passed on and the ranks save; two stop the ranks at once with one line and status 130; the
    run then resumed to its end equals the uninterrupted one in every entry."""
    out = str(tmp_path / "run")
    code, stdout, stderr = run_held(flags(data, out), "Epoch: [0] [2/", lambda p: os.killpg(p.pid, signal.SIGINT), tmp_path)
    assert code == 0 and stderr == RANDOM_TEACHER + "\n", stderr[-3000:]
    step = step_of(out)
    assert 2 < step < 6 and f"SIGINT: saved epoch 0 step {step}" in stdout

    code, stdout, stderr = run_held(flags(data, out), "Epoch: [1] [2/", lambda p: os.killpg(p.pid, signal.SIGINT), tmp_path,
                                    times=2)
    assert code == 130 and stderr.splitlines() == [
        RANDOM_TEACHER,
        "error: stopped at once by a second Ctrl-C: the run folder keeps its last checkpoint (--resume auto goes on from it)"
    ], stderr[-3000:]
    code, stdout, stderr = run(launch(flags(data, out)), tmp_path=tmp_path)
    assert code == 0 and "resumed from" in stdout, stderr[-3000:]
    assert_same_state(uninterrupted, torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True), skip={".args.output_dir"})


def test_killed_rank_restarts_from_the_last_checkpoint(data, uninterrupted, tmp_path):
    """Rank 1 killed while rank 0 is held after epoch 1's step 2 (tests/held_train.py), so the kill
    lands mid-epoch however fast the run goes; rank 0 is let go once rank 1 is gone."""
    out = str(tmp_path / "run")
    release = os.path.join(str(tmp_path), "release")

    def kill_rank_1(proc, line):
        if os.path.exists(release):  # done (this line: the launcher's stop reached rank 0 while held)
            return
        for pid in children(proc.pid):
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"RANK=1" in f.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
                    while not gone(pid):
                        time.sleep(0.01)
        open(release, "w").close()

    code, stdout, stderr = run(launch(flags(data, out), ["--max-restarts", "1"], held=True), "held: requested", kill_rank_1,
                               tmp_path, env={"HOLD_AFTER": "Epoch: [1] [2/", "HOLD_RELEASE": release}, every=True)
    assert code == 0, stderr[-3000:]
    assert "torchrun restart 1 of 1" in stdout and f"resumed from {out}/checkpoint.pth: epoch 1, step 0" in stdout
    # rank 0 says its peer is gone, once (the killed rank's orphaned loader workers may add noise of their own)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1 and all(line.startswith("error: another process of this run is gone") for line in errors)
    final = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert_same_state(uninterrupted, final, skip={".args.output_dir"})


def test_one_error_line_per_run_under_torchrun(tmp_path):
    """Through experiments/run_baseline.sh: both ranks find the missing data path, one says it,
    the other exits quietly with the same status, and the launcher adds no traceback."""
    missing = str(tmp_path / "nowhere")
    env = {**ENV, "NGPUS": "2", "MASTER_PORT": str(free_port()), "DATA_PATH": missing, "OUTPUT_DIR": str(tmp_path / "out")}
    result = subprocess.run(["sh", os.path.join(ROOT, "experiments", "run_baseline.sh"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: data path {missing} does not exist: pass --data-path pointing at a folder with train/ and val/ "
        "(or use --dataset synthetic)"
    ]
