"""Every loss term and gradient of the cakd distiller against the plain, hook-free
recomputation of ``reference.md`` in ``reference_impl.py``: losses to 1e-5 relative,
gradients to 1e-4."""
import copy

import pytest
import torch
import torchvision

import cakd
from reference_impl import make_small_pair, reference_losses

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


def run_both(student, teacher, images, targets, epoch, label_smoothing=0.0):
    distiller = cakd.build_distiller("cakd", student, teacher, label_smoothing=label_smoothing)
    distiller.train()
    t = distiller.trainable
    # the reference runs on copies: both steps update BatchNorm running stats
    ref_student, ref_disc = copy.deepcopy(student), copy.deepcopy(distiller.discriminator)
    qkv = t.pca_proj.to_qkv.weight.detach().clone().requires_grad_()
    gl_w = [w.detach().clone().requires_grad_() for w in t.gl_proj.weight]
    gl_b = [b.detach().clone().requires_grad_() for b in t.gl_proj.bias]
    cls_w = t.cls_proj.weight.detach().clone().requires_grad_()
    cls_b = t.cls_proj.bias.detach().clone().requires_grad_()

    ours = distiller(images, targets, epoch=epoch)
    ref = reference_losses(
        ref_student, teacher, ref_disc, qkv, gl_w, gl_b, cls_w, cls_b, images, targets, epoch, label_smoothing
    )
    for name in LOSSES:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")

    # discriminator gradients of L_D
    d_params = list(distiller.discriminator.parameters())
    ours_d = torch.autograd.grad(ours["disc"], d_params, retain_graph=True)
    ref_d = torch.autograd.grad(ref["disc"], list(ref_disc.parameters()), retain_graph=True)
    for (name, _), a, b in zip(distiller.discriminator.named_parameters(), ours_d, ref_d):
        assert_grads_close(a, b, f"disc.{name}")
    torch.testing.assert_close(
        dict(distiller.discriminator.named_buffers()), dict(ref_disc.named_buffers()), rtol=1e-5, atol=1e-6
    )

    # student and projector gradients of the total loss
    ours["total"].backward()
    ref["total"].backward()
    ref_student_params = dict(ref_student.named_parameters())
    for name, p in student.named_parameters():
        assert_grads_close(p.grad, ref_student_params[name].grad, f"student.{name}")
    assert_grads_close(t.pca_proj.to_qkv.weight.grad, qkv.grad, "pca_proj.to_qkv.weight")
    assert_grads_close(t.gl_proj.weight.grad, torch.stack([w.grad for w in gl_w]), "gl_proj.weight")
    assert_grads_close(t.gl_proj.bias.grad, torch.stack([b.grad for b in gl_b]), "gl_proj.bias")
    assert_grads_close(t.cls_proj.weight.grad, cls_w.grad, "cls_proj.weight")
    assert_grads_close(t.cls_proj.bias.grad, cls_b.grad, "cls_proj.bias")
    return distiller, ours


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
    distiller, _ = run_both(student, teacher, torch.randn(2, 3, 224, 224), torch.tensor([0, 9]), epoch=40)
    assert distiller.trainable.taps.stage == "layer4"


def test_resnet50_vit_b_16_full_size():
    torch.manual_seed(0)
    student = torchvision.models.resnet50(num_classes=1000)
    teacher = perturb(cakd.build_teacher("vit_b_16", weights=None))
    torch.manual_seed(8)
    images = torch.randn(2, 3, 224, 224)
    distiller, ours = run_both(student, teacher, images, torch.tensor([3, 999]), epoch=40)
    assert distiller.trainable.taps.stage == "layer3"
    assert distiller.trainable.gl_proj.weight.shape == (16, 768, 1024)


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
