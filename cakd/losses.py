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
