"""The distillation losses of plain tensors, each against a recomputation written from its
own paper's equations (float64, random inputs, a batch with repeated samples, a batch of 2)."""
import math

import pytest
import torch

import cakd


def hinton_kd(student_logits, teacher_logits, temperature):
    """Hinton, Vinyals and Dean (2015), Sec. 2: soft targets q_i = exp(z_i / T) / sum_j exp(z_j / T);
    the soft-target term is the cross-entropy to the teacher's q less its entropy (the KL
    divergence), scaled by T^2, here averaged over the batch."""
    total = 0.0
    for z_s, z_t in zip(student_logits, teacher_logits):
        q_t = [math.exp(v / temperature) for v in z_t.tolist()]
        q_t = [v / sum(q_t) for v in q_t]
        norm = sum(torch.exp(v / temperature) for v in z_s)
        log_q_s = [v / temperature - torch.log(norm) for v in z_s]
        total = total + sum(p * (math.log(p) - log_p) for p, log_p in zip(q_t, log_q_s))
    return temperature**2 * total / len(student_logits)


BATCHES = {
    "random": lambda: torch.randn(6, 5, dtype=torch.float64) * 3,
    "repeated": lambda: torch.randn(3, 5, dtype=torch.float64).repeat(2, 1),
    "two": lambda: torch.randn(2, 5, dtype=torch.float64),
}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_kd_loss_is_hintons_soft_target_term(kind, temperature):
    torch.manual_seed(0)
    student, teacher = BATCHES[kind]().requires_grad_(), BATCHES[kind]().requires_grad_()
    ours = cakd.kd_loss(student, teacher, temperature)
    expected = hinton_kd(student, teacher.detach(), temperature)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)  # ours runs in float32
    (grad,) = torch.autograd.grad(ours, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    # Hinton et al.'s closed form of that gradient: T (q_S - q_T) / batch
    closed = temperature * (torch.softmax(student / temperature, 1) - torch.softmax(teacher / temperature, 1)) / len(student)
    torch.testing.assert_close(grad.double(), closed.detach(), rtol=1e-4, atol=1e-6)
    assert torch.autograd.grad(ours, teacher, allow_unused=True) == (None,)  # no gradient to the teacher


def test_kd_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    torch.manual_seed(0)
    teacher = torch.randn(4, 10)
    assert cakd.kd_loss(teacher.clone(), teacher).abs().item() < 1e-6
    assert cakd.kd_loss(torch.randn(4, 10), teacher).item() > 0


def test_kd_recipe_weighs_labels_and_soft_targets(small_pair, batch):
    """``kd``: (1 - alpha) * CE(z_S, y) + alpha * kd_loss(z_S, z_T, T), Hinton's combination."""
    student, teacher = small_pair
    images, targets = batch
    distiller = cakd.build_distiller("kd", student, teacher, kd_temperature=2.0, kd_alpha=0.3).train()
    torch.manual_seed(0)
    losses = distiller(images, targets)
    with torch.no_grad():
        z_t = teacher(images)
    torch.manual_seed(0)
    student.train()
    z_s = student(images)
    ce = torch.nn.functional.cross_entropy(z_s, targets)
    expected = 0.7 * ce + 0.3 * hinton_kd(z_s.double(), z_t.double(), 2.0).float()
    torch.testing.assert_close(losses["cls"], ce)
    torch.testing.assert_close(losses["total"], expected, rtol=1e-5, atol=1e-6)
    assert set(losses) == {"cls", "kd", "total"}


@pytest.mark.parametrize("bad, message", [(dict(kd_alpha=1.5), "kd_alpha"), (dict(kd_temperature=0.0), "kd_temperature"),
                                          (dict(logits_form="l1"), "logits_form")])
def test_kd_options_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        cakd.KDConfig(**bad)
