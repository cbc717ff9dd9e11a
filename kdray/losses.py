"""The distillation loss of the paper, as one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """``alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    The teacher logits are detached: gradients reach the student only. The T^2 factor keeps
    the soft term's gradient magnitude independent of T (Hinton et al., 2015). Unlike the
    paper's public Keras code, the soft term here is computed from the student's logits, so it
    actually trains the student.

    Args:
        alpha: weight of the hard (label) term, in [0, 1]; 1 is plain cross-entropy.
        temperature: softening temperature T > 0.

    Raises:
        ValueError: alpha outside [0, 1] or temperature <= 0.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss", "hard", "soft"}``; ``soft`` is the unweighted T^2-scaled KL term.

        ``teacher_logits`` may be None only when alpha == 1 (no teacher needed).
        """
        hard = F.cross_entropy(student_logits, targets)
        if teacher_logits is None:
            if self.alpha < 1.0:
                raise ValueError("teacher_logits are required when alpha < 1")
            soft = hard.new_zeros(())
        else:
            t = self.temperature
            log_p_student = F.log_softmax(student_logits / t, dim=1)
            log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
            soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
            soft = soft * t * t
        loss = self.alpha * hard + (1.0 - self.alpha) * soft
        return {"loss": loss, "hard": hard.detach(), "soft": soft.detach()}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"
