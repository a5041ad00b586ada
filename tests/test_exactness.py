"""Every loss term and gradient of the cakd distiller against the plain, hook-free
recomputation of ``reference.md`` in ``reference_impl.py``: losses to 1e-5 relative,
gradients to 1e-4.

The reference owns its projectors and PatchGAN (shapes from the spec, not from the project);
the project's state enters through its strict loader, so another PatchGAN width, projector
width or group count fails on load, and another head split fails on the values."""
import copy

import pytest
import torch
import torchvision

import cakd
from cakd.discriminator import PatchGAN
from reference_impl import ReferenceCAKD, SpecMismatch, make_small_pair, project_to_released, split_trainable_state

LOSSES = ("cls", "pca", "gl", "adv", "disc", "total")


def perturb(teacher, seed=1, std=0.05):
    """torchvision zero-initialises the ViT head and some biases; random noise makes z_T real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return teacher


def assert_grads_close(ours, ref, name):
    scale = ref.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def build_both(student, teacher, label_smoothing=0.0, **overrides):
    """The project's distiller and the reference, the latter on hook-free copies of the models
    (taken before the project taps them) with the project's state copied in strictly."""
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    distiller = cakd.build_distiller("cakd", student, teacher, label_smoothing=label_smoothing, **overrides)
    distiller.train()
    ref = ReferenceCAKD(ref_student, ref_teacher)
    ref.load_project_state(distiller.trainable.state_dict(), distiller.discriminator.state_dict())
    return distiller, ref


def run_both(student, teacher, images, targets, epoch, label_smoothing=0.0):
    distiller, ref = build_both(student, teacher, label_smoothing)
    t = distiller.trainable

    ours = distiller(images, targets, epoch=epoch)
    out = ref(images, targets, epoch, label_smoothing)
    for name in LOSSES:
        torch.testing.assert_close(ours[name], out[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")

    # discriminator gradients of L_D, parameter by parameter under the pix2pix names
    d_named = dict(distiller.discriminator.named_parameters())
    ref_named = dict(ref.discriminator.named_parameters())
    assert list(d_named) == list(ref_named)
    ours_d = torch.autograd.grad(ours["disc"], list(d_named.values()), retain_graph=True)
    ref_d = torch.autograd.grad(out["disc"], list(ref_named.values()), retain_graph=True)
    for name, a, b in zip(d_named, ours_d, ref_d):
        assert_grads_close(a, b, f"disc.{name}")
    torch.testing.assert_close(
        dict(distiller.discriminator.named_buffers()), dict(ref.discriminator.named_buffers()), rtol=1e-5, atol=1e-6
    )

    # student and projector gradients of the total loss
    ours["total"].backward()
    out["total"].backward()
    ref_student_params = dict(ref.student.named_parameters())
    for name, p in student.named_parameters():
        assert_grads_close(p.grad, ref_student_params[name].grad, f"student.{name}")
    # the project's gradients in the spec's checkpoint layout, against the reference's own
    _, ours_proj = split_trainable_state({name: p.grad for name, p in t.named_parameters()})
    ours_proj = project_to_released(ours_proj, ref.dims["num_groups"])
    ref_proj = dict(ref.projectors.named_parameters())
    assert set(ours_proj) == set(ref_proj)
    for name, p in ref_proj.items():
        assert_grads_close(ours_proj[name], p.grad, name)
    return distiller, ours, ref


@pytest.mark.parametrize("epoch", [0, 30, 40])
def test_small_pair_hard_targets(epoch):
    student, teacher = make_small_pair(image_size=96)  # 6x6 grid: layer3, 4 groups
    torch.manual_seed(5)
    images = torch.randn(2, 3, 96, 96)
    run_both(student, teacher, images, torch.tensor([1, 8]), epoch)


def test_small_pair_soft_targets_label_smoothing():
    student, teacher = make_small_pair(image_size=96)
    torch.manual_seed(6)
    images = torch.randn(3, 3, 96, 96)
    targets = torch.softmax(torch.randn(3, 10), -1)  # as after MixUp / CutMix
    run_both(student, teacher, images, targets, epoch=45, label_smoothing=0.1)


def test_patch32_pair_layer4_seven_by_seven():
    student, teacher = make_small_pair(image_size=224, patch_size=32)
    torch.manual_seed(7)
    distiller, _, ref = run_both(student, teacher, torch.randn(2, 3, 224, 224), torch.tensor([0, 9]), epoch=40)
    assert distiller.trainable.taps.stage == ref.dims["stage"] == "layer4"
    assert ref.dims["num_groups"] == 4


def test_resnet50_vit_b_16_full_size():
    torch.manual_seed(0)
    student = torchvision.models.resnet50(num_classes=1000)
    teacher = perturb(cakd.build_teacher("vit_b_16", weights=None))
    torch.manual_seed(8)
    images = torch.randn(2, 3, 224, 224)
    distiller, ours, ref = run_both(student, teacher, images, torch.tensor([3, 999]), epoch=40)
    assert distiller.trainable.taps.stage == ref.dims["stage"] == "layer3"
    assert distiller.trainable.gl_proj.weight.shape == (16, 768, 1024)
    # the reference's own shapes, from the spec: 3*16*64 x 1024, 16 groups of 768 x 1024, 768 x 2048
    assert ref.projectors.pca_proj.to_qkv.weight.shape == (3072, 1024)
    assert [fc.weight.shape for fc in ref.projectors.group_layers()] == [(768, 1024)] * 16
    assert ref.projectors.cls_proj.weight.shape == (768, 2048)


def test_lambda_ramp():
    student, teacher = make_small_pair(image_size=96)
    distiller = cakd.build_distiller("cakd", student, teacher)
    assert [distiller.distill_weight(e) for e in (0, 25, 26, 30, 35, 119)] == [0, 0, 0.02, 0.1, 0.2, 0.2]
    custom = cakd.build_distiller("cakd", student, teacher, lambda_start=0, lambda_span=10, lambda_max=1.0)
    assert custom.distill_weight(5) == 0.5


def test_released_update_order_and_quirks():
    """disc.backward(retain_graph) -> D step -> total.backward() runs; by default the student
    gets no adversarial gradient and L_D none from its real term; flipped, both do."""
    student, teacher = make_small_pair(image_size=96)
    images, targets = torch.randn(2, 3, 96, 96), torch.tensor([1, 2])

    def step(**overrides):
        torch.manual_seed(0)
        distiller = cakd.build_distiller("cakd", copy.deepcopy(student), teacher, **overrides)
        d_opt = torch.optim.SGD(distiller.discriminator.parameters(), lr=0.1)
        losses = distiller(images, targets, epoch=40)
        losses["disc"].backward(retain_graph=True)
        d_opt.step()
        losses["total"].backward()
        return distiller, losses

    released, losses = step()
    flipped, flipped_losses = step(adv_to_student=True)
    # the adversarial value is the same; only where its gradient goes differs
    torch.testing.assert_close(losses["adv"], flipped_losses["adv"])
    assert not losses["adv"].requires_grad
    g_released = released.trainable.pca_proj.to_qkv.weight.grad
    g_flipped = flipped.trainable.pca_proj.to_qkv.weight.grad
    assert (g_released - g_flipped).abs().max() > 1e-9
    # the difference is exactly lambda * dL_adv/dtheta, taken with D as it was at the forward
    torch.manual_seed(0)
    fresh = cakd.build_distiller("cakd", copy.deepcopy(student), teacher, adv_to_student=True)
    adv = fresh(images, targets, epoch=40)["adv"]
    (g_adv,) = torch.autograd.grad(0.2 * adv, [fresh.trainable.pca_proj.to_qkv.weight])
    assert_grads_close(g_flipped - g_released, g_adv, "adversarial gradient")

    # real-term switch: with it on, D's real logit gets gradient from L_D
    torch.manual_seed(0)
    real_on = cakd.build_distiller("cakd", copy.deepcopy(student), teacher, disc_real_grad=True)
    torch.manual_seed(0)
    real_off = cakd.build_distiller("cakd", copy.deepcopy(student), teacher)
    on, off = real_on(images, targets, 40)["disc"], real_off(images, targets, 40)["disc"]
    torch.testing.assert_close(on, off)
    g_on = torch.autograd.grad(on, list(real_on.discriminator.parameters()))
    g_off = torch.autograd.grad(off, list(real_off.discriminator.parameters()))
    assert max((a - b).abs().max() for a, b in zip(g_on, g_off)) > 1e-9


def test_yardstick_sees_other_widths_and_head_splits():
    """Project modules of other shapes than the spec's fail the reference's strict load (another
    PatchGAN width, head width, group count, a missing projector); 32 heads of 32, which has the
    released weight shape, loads but gives other maps, so the losses differ."""
    pristine, teacher = make_small_pair(image_size=96)  # 6x6 grid: 4 groups; C = 256
    distiller, ref = build_both(copy.deepcopy(pristine), teacher)
    trainable, disc = distiller.trainable.state_dict(), distiller.discriminator.state_dict()
    ref.load_project_state(trainable, disc)  # the released shapes load
    with pytest.raises(SpecMismatch, match=r"discriminator: model.0.weight has shape \(16, 1, 4, 4\), the spec's is \(8, 1, 4, 4\)"):
        ref.load_project_state(trainable, PatchGAN(width=16).state_dict())
    cases = [
        (dict(pca_heads=16, pca_head_dim=32), r"pca_proj.to_qkv.weight has shape \(1536, 256\), the spec's is \(3072, 256\)"),
        (dict(gl_window=2), r"gl_proj.weight \(9, 32, 256\).*window rule gives 4 groups"),
        (dict(use_token=False), r"projector keys .* are not the released projectors'"),
    ]
    for overrides, message in cases:
        other = cakd.build_distiller("cakd", copy.deepcopy(pristine), teacher, **overrides)
        with pytest.raises(SpecMismatch, match=message):
            ref.load_project_state(other.trainable.state_dict(), disc)
        other.close()
    with pytest.raises(SpecMismatch, match="keys differ from the spec's: missing \\['model.11.bias'\\]"):
        ref.load_project_state(trainable, {k: v for k, v in disc.items() if k != "model.11.bias"})
    distiller.close()

    # 32 heads of 32: the same (3072, C) weight, loaded strictly, yet other numbers
    distiller, ref = build_both(copy.deepcopy(pristine), teacher, pca_heads=32, pca_head_dim=32)
    assert distiller.trainable.pca_proj.to_qkv.weight.shape == ref.projectors.pca_proj.to_qkv.weight.shape
    torch.manual_seed(4)
    images, targets = torch.randn(2, 3, 96, 96), torch.tensor([1, 2])
    ours, out = distiller(images, targets, epoch=40), ref(images, targets, 40)
    torch.testing.assert_close(ours["cls"], out["cls"], rtol=1e-5, atol=1e-7)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours["pca"], out["pca"], rtol=1e-5, atol=1e-7)
