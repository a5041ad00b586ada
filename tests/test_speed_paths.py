"""The optimized paths give the plain path's losses: batched group-wise projector,
channels_last, bf16 autocast on the CPU."""
import copy

import pytest
import torch

import cakd
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
           "--steps", "2", "--warmup", "1", "--loader-workers", "0", "--loader-batches", "1", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    modes = [row["mode"] for row in report["steps"]]
    assert modes == ["ideal", "baseline", "logits", "cakd", "released_style"]
    for row in report["steps"]:
        assert row["median_s"] > 0 and row["peak_mib"] > 0 and row["time_ratio"] > 0
    assert report["loader"][0]["images_per_s"] > 0
    assert "| cakd |" in result.stdout
