"""The optimized paths give the plain path's losses: batched group-wise projector,
channels_last, bf16 autocast on the CPU, folded attention maps, the lambda = 0 step; and the
benchmark's profile."""
import copy
import functools

import pytest
import torch
import torchvision

import cakd
import test_exactness
from cakd.train.engine import training_step
from reference_impl import make_small_pair


def losses_of(student, teacher, images, targets, memory_format=torch.contiguous_format, bf16=False, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    distiller = cakd.build_distiller("cakd", copy.deepcopy(student), copy.deepcopy(teacher), **overrides)
    distiller.to(dtype).to(memory_format=memory_format)
    images = images.to(dtype).to(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = distiller(images, targets, epoch=40)
    grad = torch.autograd.grad(losses["total"], [distiller.trainable.gl_proj.weight, distiller.student.conv1.weight])
    distiller.close()
    dtypes = {k: v.dtype for k, v in losses.items()}
    return {k: v.detach().double() for k, v in losses.items()}, [g.double() for g in grad], dtypes


@pytest.fixture(scope="module")
def setup():
    student, teacher = make_small_pair(image_size=96)
    torch.manual_seed(3)
    return student, teacher, torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 2, 3])


def test_batched_projector_equals_loop(setup):
    student, teacher, images, targets = setup
    (a, ga, _), (b, gb, _) = losses_of(*setup), losses_of(*setup, gl_batched=False)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_channels_last_as_accurate_as_contiguous(setup):
    """The same losses, and gradients as close to a float64 recomputation as the plain path's
    (this small random student is ill-conditioned: fp32 itself is ~0.5% off on conv1)."""
    (exact, g_exact, _) = losses_of(*setup, dtype=torch.float64)
    (a, ga, _), (b, gb, _) = losses_of(*setup), losses_of(*setup, memory_format=torch.channels_last)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    for plain, fast, truth in zip(ga, gb, g_exact):
        assert (fast - truth).abs().max() <= 4 * (plain - truth).abs().max() + 1e-7


def test_bf16_autocast_close_to_fp32(setup):
    """bf16 has an 8-bit mantissa: losses agree to a few percent, and are computed in fp32."""
    (a, _, _), (b, _, dtypes) = losses_of(*setup), losses_of(*setup, bf16=True)
    assert set(dtypes) == {"cls", "pca", "gl", "adv", "disc", "total"}
    assert dtypes == dict.fromkeys(dtypes, torch.float32), f"losses under bf16 autocast not all float32: {dtypes}"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=5e-2, atol=2e-2)


def test_loss_helpers_compute_in_fp32_outside_autocast():
    """Under autocast torch itself runs mse_loss / BCE in fp32; outside it (bf16 targets kept
    from an autocast forward, a bf16 model) the helpers must cast: fp32 results, fp32 arithmetic."""
    from cakd.discriminator import gan_loss
    from cakd.distillers import mse

    torch.manual_seed(0)
    a, b = torch.randn(4, 300), torch.randn(4, 300)
    a16, b16 = a.bfloat16(), b.bfloat16()
    out = mse(a16, b16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.mse_loss(a16.float(), b16.float()), rtol=1e-6, atol=0)
    for real in (True, False):
        assert gan_loss(a16, real).dtype == torch.float32


def test_torch_compile_gives_the_same_losses(setup):
    """torch.compile of the student (with projectors) and of the teacher traces the taps'
    hooks: same losses and teacher targets as eager."""
    student, teacher, images, targets = setup
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        distiller = cakd.build_distiller("cakd", copy.deepcopy(student), teacher)
        if compiled:
            distiller.compile()
        losses = distiller(images, targets, epoch=40)
        losses["total"].backward()
        results.append(({k: v.detach() for k, v in losses.items()}, distiller.run_teacher(images)))
        distiller.close()
    (eager, t_eager), (comp, t_comp) = results
    for key in eager:
        torch.testing.assert_close(comp[key], eager[key], rtol=1e-4, atol=1e-5)
    for key in t_eager:
        torch.testing.assert_close(t_comp[key], t_eager[key], rtol=1e-4, atol=1e-5)


def test_benchmark_script_runs_and_reports_every_mode(tmp_path):
    """A smoke run of scripts/benchmark.py (figures are for the README, not for tests)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(root, "scripts", "benchmark.py"), "--device", "cpu", "--batch-size", "2",
           "--student", "resnet18", "--teacher", "vit_b_32", "--image-size", "64", "--num-classes", "10",
           "--steps", "2", "--warmup", "1", "--loader-workers", "0", "--loader-batches", "1", "--json", str(out),
           "--profile", "--profile-steps", "1", "--flops"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    modes = [row["mode"] for row in report["steps"]]
    assert modes == ["ideal", "baseline", "logits", "cakd", "released_style"]
    for row in report["steps"]:
        assert row["median_s"] > 0 and row["peak_mib"] > 0 and row["time_ratio"] > 0
    assert report["loader"][0]["images_per_s"] > 0
    assert "| cakd |" in result.stdout
    parts = report["profile_ms"]
    assert parts["attention projector and its maps"] > 0 and parts["discriminator forward/backward"] > 0
    assert parts["optimizer of the projectors"] > 0 and "| sum of the parts |" in result.stdout
    flops = {row["mode"]: row["flops"] for row in report["steps"]}
    # the teacher's forward, counted from ViT-B/32's shapes: 2 images of 4 patches + the class token
    b, n, d, mlp = 2, 5, 768, 3072
    per_layer = b * n * d * 3 * d + 2 * b * n * n * d + b * n * d * d + 2 * b * n * d * mlp  # qkv, two attention products, out, MLP
    teacher = 2 * (b * 4 * 3 * 32 * 32 * d + 12 * per_layer + b * d * 10)  # patch embedding, 12 blocks, head
    assert flops["ideal"] - flops["baseline"] == teacher  # fused attention included
    assert flops["logits"] == flops["ideal"] < flops["cakd"] < flops["released_style"]


@pytest.mark.parametrize("image_size,patch_size", [(96, 16), (224, 32)])
def test_folded_maps_pass_the_yardstick(monkeypatch, image_size, patch_size):
    """``map_fold="always"``: the student's q k^T map as ``S (W_q^T W_k) S^T`` even on these small
    batches (where "auto" would not fold), the teacher's from its cached folded in_proj; the
    yardstick's own checks (every loss 1e-5, every gradient 1e-4, D's buffers) pass."""
    monkeypatch.setattr(test_exactness, "build_both", functools.partial(test_exactness.build_both, map_fold="always"))
    student, teacher = make_small_pair(image_size=image_size, patch_size=patch_size)
    torch.manual_seed(5)
    images = torch.randn(2, 3, image_size, image_size)
    distiller, _, _ = test_exactness.run_both(student, teacher, images, torch.tensor([1, 8]), epoch=40)
    assert distiller.trainable.pca_proj.folds(torch.zeros(2, 1, 8))
    assert distiller._teacher_taps._folded[1] is not None  # the teacher's maps came from the folded form


def step_state(distiller, images, targets, epoch, steps=1):
    """Losses of the last of ``steps`` released-order steps (the trainer's ``training_step``: SGD
    with momentum and weight decay for both), and every parameter, gradient and buffer after it."""
    opt = torch.optim.SGD(distiller.trainable.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    d_opt = torch.optim.SGD(distiller.discriminator.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(steps):
        losses = training_step(distiller, images, targets, epoch, opt, d_opt)
    state = {f"{name}.grad": p.grad for name, p in distiller.named_parameters()}
    state.update(distiller.state_dict())
    return {k: v.detach() for k, v in losses.items()}, state


def assert_states_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, f"{name}: a gradient on one path only"
            continue
        scale = b[name].double().abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a[name].double(), b[name].double(), rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def test_auto_fold_at_full_size_equals_never():
    """ResNet-50 <- ViT-B/16, batch 6: 1176 tokens > 1024 channels, so "auto" folds the student's
    map (and the teacher's): losses at 1e-5, and after one released-order step every gradient,
    parameter and buffer (D's BatchNorm too) at 1e-4, against map_fold="never"."""
    torch.manual_seed(0)
    student = torchvision.models.resnet50(num_classes=1000)
    teacher = test_exactness.perturb(cakd.build_teacher("vit_b_16", weights=None))
    torch.manual_seed(8)
    images, targets = torch.randn(6, 3, 224, 224), torch.randint(0, 1000, (6,))
    results = []
    for fold in ("auto", "never"):
        torch.manual_seed(0)
        distiller = cakd.build_distiller("cakd", copy.deepcopy(student), teacher, map_fold=fold)
        assert distiller.trainable.pca_proj.folds(torch.zeros(6, 196, 1024)) == (fold == "auto")
        results.append(step_state(distiller, images, targets, epoch=40))
        distiller.close()
    (losses, state), (plain_losses, plain_state) = results
    for name in plain_losses:
        torch.testing.assert_close(losses[name], plain_losses[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert_states_close(state, plain_state)


def test_teacher_fold_follows_the_teacher_weights(setup):
    """The teacher's folded in_proj (biases included) is cached per weight tensor and version: after
    an in-place load and after ``.double()`` the maps still equal the unfolded ones."""
    from cakd.teachers.registry import teacher_taps

    _, teacher, images, _ = setup
    teacher = copy.deepcopy(teacher)
    taps = teacher_taps(teacher, 96)
    attn = teacher.encoder.layers[-1].self_attention

    def check(x):
        with torch.no_grad():
            taps.fold = "auto"
            folded = taps(x)
            taps.fold = "never"
            plain = taps(x)
        for key in ("attn_qk", "attn_vv"):
            torch.testing.assert_close(folded[key], plain[key], rtol=1e-5, atol=1e-5 * plain[key].abs().max().item())

    check(images)
    state = {k: v + 0.3 * torch.randn_like(v) if k.endswith("self_attention.in_proj_weight") or k.endswith("in_proj_bias") else v
             for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)  # in place: same tensors, new versions
    check(images)
    teacher.double()
    check(images.double())
    assert taps._folded[1].dtype == torch.float64 and attn.in_proj_weight.dtype == torch.float64
    taps.remove()


def test_zero_lambda_step_is_the_plain_step(setup):
    """At lambda = 0 (the released recipe's epochs 0-25) the projectors run without autograd and
    get zero gradients: two released-order SGD steps (momentum, weight decay) leave every
    loss, gradient, parameter and buffer as the plain step does; a non-finite distillation term
    still makes the total non-finite (so the trainer still stops)."""
    student, teacher, images, targets = setup
    results = []
    for skip in (True, False):
        torch.manual_seed(0)
        distiller = cakd.build_distiller("cakd", copy.deepcopy(student), teacher, zero_lambda_no_grad=skip)
        results.append(step_state(distiller, images, targets, epoch=0, steps=2))
        losses = distiller(images, targets, epoch=0)
        assert losses["pca"].requires_grad is not skip  # the fast path ran (or not)
        for p in distiller.trainable.projector_parameters():
            assert p.grad is not None and (not skip or not p.grad.any())
        with torch.no_grad():
            distiller.trainable.gl_proj.bias[0, 0] = float("inf")
        assert not torch.isfinite(distiller(images, targets, epoch=0)["total"])
        distiller.close()
    (losses, state), (plain_losses, plain_state) = results
    for name in plain_losses:
        torch.testing.assert_close(losses[name], plain_losses[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert_states_close(state, plain_state)


def test_profile_matches_backward_to_its_range():
    """``part_times`` counts the backward of the ops run inside a range (the Linear's) in that
    range, and not the backward of ops run outside it (the loss's)."""
    from bench.profiling import part_times
    from torch.profiler import profile, record_function

    layer = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)
    with profile() as prof:
        with record_function("cakd.groupwise_projector"):
            y = layer(x)
        y.square().sum().backward()
    events = prof.events()

    def total(names):
        return sum(e.cpu_time_total for e in events if e.name in names)

    forward = total({"cakd.groupwise_projector"})
    inside = total({"autograd::engine::evaluate_function: AddmmBackward0", "autograd::engine::evaluate_function: TBackward0"})
    outside = total({"autograd::engine::evaluate_function: PowBackward0", "autograd::engine::evaluate_function: SumBackward0"})
    totals = part_times(events, device_time=False)
    assert inside > 0 and outside > 0
    assert totals["cakd.groupwise_projector"] == pytest.approx(forward + inside)
    assert totals["cakd.attention_projector"] == 0


def test_zero_lambda_path_under_ddp_trains_as_the_plain_path(tmp_path):
    """Two gloo processes, the cakd recipe in its lambda = 0 epochs (the released first 25): the
    projectors' zero gradients (no backward through them) go through DDP's all-reduce and the
    final checkpoint equals, entry for entry, the run that back-propagates lambda * terms."""
    from make_image_folder import make_image_folder
    from test_train import assert_same_state, small_flags, torchrun

    data = make_image_folder(str(tmp_path / "data"), num_classes=3, train_per_class=4, val_per_class=1, size=72)
    states = []
    for name, switch in (("fast", "true"), ("plain", "false")):
        out = str(tmp_path / name)
        flags = small_flags("cakd", data, out, epochs=1)
        flags = flags[: flags.index("--lambda-start")] + ["--zero-lambda-no-grad", switch]  # released ramp: lambda 0
        assert "lambda stays 0 in all 1 epoch(s)" in torchrun(flags).stdout
        states.append(torch.load(f"{out}/checkpoint.pth", weights_only=True))
    fast, plain = states
    assert fast["args"]["zero_lambda_no_grad"] is True and plain["args"]["zero_lambda_no_grad"] is False
    assert_same_state(fast, plain, skip={".args.output_dir", ".args.zero_lambda_no_grad"})
    assert fast["optimizer"]["state"]  # the projectors' momentum buffers exist: they were stepped
