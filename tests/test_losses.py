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


def rows(kind, width):
    """A batch of ``width``-wide rows of each kind: 6 random, 3 repeated twice, or 2."""
    count = {"random": 6, "repeated": 3, "two": 2}[kind]
    x = torch.randn(count, width, dtype=torch.float64) * 3
    return x.repeat(2, 1) if kind == "repeated" else x


def distance(x, i, j):
    """||x_i - x_j||, a constant 0 for a repeated sample (no direction to follow)."""
    if torch.equal(x[i], x[j]):
        return torch.zeros((), dtype=x.dtype)
    return torch.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j])))


def huber(a, b):
    """Park et al., Eq. 4: the Huber loss with delta 1."""
    d = abs(a - b)
    return 0.5 * d**2 if d <= 1 else d - 0.5


def park_rkd(student, teacher, distance_weight, angle_weight):
    """Park et al. (CVPR 2019), Eq. 4-7: psi_D(t_i, t_j) = ||t_i - t_j|| / mu, mu the mean
    distance over the pairs i != j; psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) /
    ||t_i - t_j||; each Huber loss averaged over the pairs, and over the triplets of
    distinct indices (none in a batch of 2: 0)."""
    n = len(student)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    triplets = [(i, j, k) for i, j in pairs for k in range(n) if k not in (i, j)]

    def psi_d(x):
        d = {(i, j): distance(x, i, j) for i, j in pairs}
        mu = sum(d.values()) / len(pairs)
        return {p: v / mu for p, v in d.items()}

    def unit(x, i, j):
        d = distance(x, i, j)
        return (x[i] - x[j]) / d if d > 0 else torch.zeros_like(x[i])

    def psi_a(x):
        return {(i, j, k): torch.dot(unit(x, i, j), unit(x, k, j)) for i, j, k in triplets}

    d_s, d_t = psi_d(student), psi_d(teacher)
    a_s, a_t = psi_a(student), psi_a(teacher)
    loss_d = sum(huber(d_s[p], d_t[p]) for p in pairs) / len(pairs)
    loss_a = sum(huber(a_s[p], a_t[p]) for p in triplets) / len(triplets) if triplets else 0.0
    return distance_weight * loss_d + angle_weight * loss_a


@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 2.0)])
@pytest.mark.parametrize("kind", ["random", "repeated", "two"])
def test_rkd_loss_is_parks_distance_and_angle_terms(kind, weights):
    torch.manual_seed(0)
    student, teacher = rows(kind, 5).requires_grad_(), rows(kind, 7).requires_grad_()  # widths differ
    ours = cakd.rkd_loss(student, teacher, *weights)
    expected = park_rkd(student, teacher.detach(), *weights)
    torch.testing.assert_close(ours, torch.as_tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, student)
    assert grad.isfinite().all()  # repeated samples: distance 0, no NaN
    if kind == "two":  # one normalised distance, 1 on both sides, and no triplet: nothing to learn
        assert ours.item() == 0 and not grad.any()
    else:
        (expected_grad,) = torch.autograd.grad(expected, student)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
        assert grad.abs().max() > 1e-3
    assert torch.autograd.grad(ours, teacher, allow_unused=True) == (None,)


def test_rkd_loss_sees_relations_only():
    """A student embedding that is the teacher's rotated, scaled and shifted has the same
    relations (normalised distances, angles): the loss is 0; a shuffled one does not."""
    torch.manual_seed(0)
    teacher = torch.randn(8, 6, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert cakd.rkd_loss(3 * teacher @ rotation + 1, teacher).item() < 1e-12
    assert cakd.rkd_loss(teacher[torch.randperm(8)], teacher).item() > 0.1


def liu_irg(z_s, z_t, features_s, features_t, transforms_s, transforms_t, weights):
    """Liu et al. (CVPR 2019), L_MTK less the cross-entropy, with the authors' Caffe layers'
    normalisation (each A and Lambda divided by its batch maximum, a constant) and reductions
    (Caffe's EuclideanLoss: half the summed squares over the blob's first axis)."""
    n = len(z_s)

    def edges(x):
        a = [[sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)]
        top = max(v.item() for row in a for v in row) or 1.0
        return [[v / top for v in row] for row in a]

    def shift(before, after):
        lam = [sum((after[i] - before[i]) ** 2) for i in range(n)]
        top = max(v.item() for v in lam) or 1.0
        return [v / top for v in lam]

    vertex = sum((z_s[i, c] - z_t[i, c]) ** 2 for i in range(n) for c in range(z_s.shape[1])) / (2 * n)
    edge = 0.0
    for f_s, f_t in zip(features_s, features_t):
        a_s, a_t = edges(f_s), edges(f_t)
        edge = edge + sum((a_s[i][j] - a_t[i][j]) ** 2 for i in range(n) for j in range(n)) / (2 * n)
    transform = 0.0
    for pair_s, pair_t in zip(transforms_s, transforms_t):
        l_s, l_t = shift(*pair_s), shift(*pair_t)
        transform = transform + sum((l_s[i] - l_t[i]) ** 2 for i in range(n)) / 2
    return weights[0] * vertex + weights[1] * edge + weights[2] * transform


@pytest.mark.parametrize("weights", [(1.0, 0.005, 0.005), (0.5, 2.0, 3.0)])
@pytest.mark.parametrize("kind", ["random", "repeated", "two"])
def test_irg_loss_is_lius_vertex_edge_and_transformation_terms(kind, weights):
    torch.manual_seed(0)
    student = [rows(kind, width).requires_grad_() for width in (10, 4, 6, 8, 8)]  # logits, 2 layers + embedding, a 2nd layer of 8
    teacher = [rows(kind, width).requires_grad_() for width in (10, 7, 5, 9, 9)]
    args = (student[0], teacher[0], student[1:4], teacher[1:4], [(student[3], student[4])], [(teacher[3], teacher[4])])
    ours = cakd.irg_loss(*args, *weights)
    detached = [t.detach() for t in teacher]
    expected = liu_irg(student[0], detached[0], student[1:4], detached[1:4], [(student[3], student[4])], [(detached[3], detached[4])], weights)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ours, student)
    expected_grads = torch.autograd.grad(expected, student)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
        assert grad.isfinite().all()  # repeated samples: distance 0, no NaN
        # two samples: A / max(A) is [[0, 1], [1, 0]] on both sides, the edges teach nothing
        edges_only = index in (1, 2)
        assert (grad.abs().max() > 1e-6) != (kind == "two" and edges_only)
    assert torch.autograd.grad(ours, teacher, allow_unused=True) == (None,) * len(teacher)


def test_irg_loss_terms_vanish_at_the_teacher_and_pairs_are_checked():
    torch.manual_seed(0)
    z, f, g = torch.randn(4, 10), torch.randn(4, 6), torch.randn(4, 6)
    assert cakd.irg_loss(z, z, [f, 2 * f], [f, f], [(f, g)], [(f, g)]).item() < 1e-12  # A is max-normalised: scale-free
    assert cakd.irg_loss(z, z, [f], [g], [], []).item() > 0
    with pytest.raises(ValueError, match="one width"):
        cakd.irg_loss(z, z, [f], [f], [(f, z)], [(f, g)])
    with pytest.raises(ValueError, match="by position"):
        cakd.irg_loss(z, z, [f, f], [f], [], [])
