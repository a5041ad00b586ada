"""Distillation losses of plain tensors, for the recipes and for a researcher's own loop."""
import torch
from torch.nn import functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s soft-target term: ``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))``,
    summed over classes and averaged over the batch, in float32; the teacher side carries no
    gradient. The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al., 2015)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def _working_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (half-precision embeddings from autocast), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values``, or 0 for an empty set (no pair, no triplet): a relation loss
    over a batch too small to hold one relation is 0, not NaN."""
    return values.sum() / max(values.numel(), 1)


def _relations(embedding: torch.Tensor):
    """RKD's potentials of one side: distances normalised by their mean over the pairs
    ``i != j`` (Park et al., Eq. 5's mu), and the cosines ``<e_ij, e_kj>`` of the angle at
    ``j`` for every triplet (Eq. 6), ``e_ij`` the unit vector from ``t_j`` to ``t_i``. A zero
    difference (a repeated sample) has distance 0 and no direction: its unit vector is 0 and
    passes no gradient, so no NaN."""
    e = _working_dtype(embedding.flatten(1))
    diff = e[:, None, :] - e[None, :, :]  # diff[i, j] = t_i - t_j
    dist = torch.linalg.vector_norm(diff, dim=2)  # its gradient at 0 is 0
    moved = dist > 0
    unit = diff * (moved / torch.where(moved, dist, torch.ones_like(dist)))[..., None]
    cosine = torch.einsum("ijd,kjd->ijk", unit, unit)  # cosine[i, j, k] = <e_ij, e_kj>
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    mu = _mean_or_zero(dist[off])
    dist = dist / torch.where(mu > 0, mu, torch.ones_like(mu))
    return dist, cosine


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Park et al.'s relational KD (CVPR 2019): ``distance_weight * L_D + angle_weight * L_A``
    over one batch of embeddings, ``(N, D_S)`` and ``(N, D_T)``: relations are ``N x N`` and
    ``N x N x N``, so the widths never need to meet. The teacher side carries no gradient.

    ``L_D``: the Huber loss (delta 1, ``smooth_l1``) between the two sides' pairwise Euclidean
    distances, each side divided by the mean of its distances over the pairs ``i != j``
    (the paper's mu over chi^2; repeated samples count with distance 0). ``L_A``: the Huber
    loss between the cosines of the angle at ``j`` of every triplet of distinct indices.
    Reductions: each Huber loss is averaged over its set, the ``N(N-1)`` ordered pairs and
    the ``N(N-1)(N-2)`` ordered triplets of distinct samples (the paper sums over chi^2 and
    chi^3; the authors' code averages over all ``N^2`` and ``N^3`` entries, the degenerate
    ones adding zeros: factors ``(N-1)/N`` and ``(N-1)(N-2)/N^2`` apart). The weights 25 and
    50 are the paper's, tuned with the averaged form. A batch of 2 shows RKD no relation: its
    one normalised distance is 1 on both sides and it holds no triplet, so the loss is 0.
    Computed in float32 at least; memory ``N^2 D``, as in the authors' angle term.
    """
    dist_s, cos_s = _relations(student_embedding)
    with torch.no_grad():
        dist_t, cos_t = _relations(teacher_embedding.detach())
    n = len(dist_s)
    eye = torch.eye(n, dtype=torch.bool, device=dist_s.device)
    pairs = ~eye
    triplets = pairs[:, :, None] & pairs.T[None, :, :] & pairs[:, None, :]  # i != j, k != j, i != k
    distance = _mean_or_zero(F.smooth_l1_loss(dist_s, dist_t, reduction="none")[pairs])
    angle = _mean_or_zero(F.smooth_l1_loss(cos_s, cos_t, reduction="none")[triplets])
    return distance_weight * distance + angle_weight * angle


def _max_normalised(values: torch.Tensor) -> torch.Tensor:
    """``values / max(values)``, the maximum held constant (a scale, not a target), as the IRG
    authors' BatchEuclideanMap/Vector layers do; all-zero values stay 0."""
    top = values.detach().max()
    return values / torch.where(top > 0, top, torch.ones_like(top))


def _edges(features: torch.Tensor) -> torch.Tensor:
    """IRG's edge matrix ``A(i, j) = ||f_i - f_j||^2`` (squared: smooth at repeated samples),
    normalised by its maximum over the batch. From the Gram matrix: memory ``N^2``, not ``N^2 D``."""
    f = _working_dtype(features.flatten(1))
    norms = f.pow(2).sum(1)
    off = ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    return _max_normalised((norms[:, None] + norms[None, :] - 2 * f @ f.T).clamp_min(0) * off)


def _shift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """IRG's vertex transformation ``Lambda(i) = ||f_l1(x_i) - f_l2(x_i)||^2`` between two
    layers of one network (of one width), normalised by its maximum over the batch."""
    before, after = _working_dtype(before.flatten(1)), _working_dtype(after.flatten(1))
    if before.shape != after.shape:
        raise ValueError(f"a transformation pair needs two layers of one width, got {tuple(before.shape)} and {tuple(after.shape)}")
    return _max_normalised((after - before).pow(2).sum(1))


def irg_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_features,
    teacher_features,
    student_transforms=(),
    teacher_transforms=(),
    vertex_weight: float = 1.0,
    edge_weight: float = 0.005,
    transform_weight: float = 0.005,
) -> torch.Tensor:
    """Liu et al.'s instance relationship graph loss (CVPR 2019, L_MTK less its
    cross-entropy): ``vertex_weight * L_V + edge_weight * sum_l L_E(l) + transform_weight *
    sum_p L_T(p)``. The teacher side carries no gradient.

    - ``L_V``, the vertices of the last layer: ``sum_i ||z_S(i) - z_T(i)||^2 / (2N)``
      between the logits (the paper's L_logits; one class count on both sides).
    - ``L_E(l)``, the edges: ``sum_ij (A_S(i, j) - A_T(i, j))^2 / (2N)`` between the
      instance-distance matrices of ``student_features[l]`` and ``teacher_features[l]``
      (paired by position, any widths: ``N x N`` relations; flattened per sample, so pass
      pooled features). Pass two or more layers and the embedding; the paper's one-to-many
      mode pairs the teacher's last layer with several student layers (repeat it).
    - ``L_T(p)``, the transformation: ``sum_i (Lambda_S(i) - Lambda_T(i))^2 / 2`` between
      how far each instance moves from ``student_transforms[p][0]`` to ``[p][1]`` and
      likewise in the teacher (two layers of one width within each network).

    Normalisation and reductions are those of the authors' released Caffe code (yufanLIU/IRG):
    ``A`` and ``Lambda`` are squared Euclidean distances divided by their batch maximum (held
    constant in the gradient, as its BatchEuclideanMap/Vector layers do), and each term is
    Caffe's EuclideanLoss, half the summed squares over the blob's first axis (``N`` for the
    logits and the ``N x N`` map, 1 for the ``Lambda`` vector). ``edge_weight`` and
    ``transform_weight`` are the 0.005 of its IRG and IRG-transformation prototxts;
    ``vertex_weight`` 1.0 (they carry no logits term) weighs the logits like the cross-entropy. Repeated samples give distance 0 and finite gradients; in a batch
    of 2, ``A / max A`` is the same on both sides, so the edges teach nothing there.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"edges pair layers by position: {len(student_features)} student and {len(teacher_features)} teacher features")
    if len(student_transforms) != len(teacher_transforms):
        raise ValueError(f"transformations pair by position: {len(student_transforms)} student and {len(teacher_transforms)} teacher pairs")
    n = len(student_logits)
    z_s, z_t = _working_dtype(student_logits), _working_dtype(teacher_logits.detach())
    vertex = (z_s - z_t).pow(2).sum() / (2 * n)
    edge = sum((_edges(s) - _edges(t.detach())).pow(2).sum() / (2 * n) for s, t in zip(student_features, teacher_features))
    transform = sum(
        (_shift(*s) - _shift(t[0].detach(), t[1].detach())).pow(2).sum() / 2
        for s, t in zip(student_transforms, teacher_transforms)
    )
    return vertex_weight * vertex + edge_weight * edge + transform_weight * transform
