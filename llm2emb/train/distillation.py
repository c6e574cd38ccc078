"""Distillation terms: the student learns the teacher's scores next to (or instead of) InfoNCE's one-hot target.

InfoNCE tells the student only which candidate is the positive; a teacher embedder also says how similar every
negative is, which carries far more signal per batch (EmbeddingGemma, jina-embeddings-v5 and KaLM-V2.5 distil
this way). Two terms, both on the candidates InfoNCE scores for each query (its positive, its hard negatives and,
when on, the in-batch negatives; masked candidates are left out of both):

- KL(p_teacher || p_student), p = softmax(score / temperature) over each query's candidates, averaged over
  queries. Its gradient in the student's scores, (p_student - p_teacher) / temperature, has the size of InfoNCE's,
  (p_student - onehot) / temperature, so weights near 1 balance the two.
- MarginMSE (Hofstätter et al., 2020) on each query's own hard negatives: the mean squared difference between the
  student's and the teacher's margins s(q, positive) - s(q, negative), taken in logits (score / temperature) so
  that it is measured in the same units as the KL term.

Hand-written because no library computes these over our candidate layout and masks (docs/CONTRACTS.md).
"""

from __future__ import annotations

import torch
from torch import nn


class Distillation(nn.Module):
    """The weighted distillation terms of one query-document score matrix; also holds InfoNCE's weight."""

    def __init__(
        self, kl_weight: float = 1.0, margin_weight: float = 0.0, temperature: float = 0.05, infonce_weight: float = 1.0
    ):
        super().__init__()
        if min(kl_weight, margin_weight, infonce_weight) < 0 or not temperature > 0:
            raise ValueError("distillation weights must be >= 0 and its temperature > 0")
        self.kl_weight = kl_weight
        self.margin_weight = margin_weight
        self.temperature = temperature
        self.infonce_weight = infonce_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weighted KL + MarginMSE for scores (B, N) of B queries against N documents (positives first)."""
        loss = student.new_zeros((), dtype=torch.float32)
        if self.kl_weight:
            loss = loss + self.kl_weight * kl_divergence(student, teacher, mask, self.temperature)
        if self.margin_weight:
            loss = loss + self.margin_weight * margin_mse(student, teacher, mask, self.temperature)
        return loss

    def extra_repr(self) -> str:
        return (f"kl_weight={self.kl_weight}, margin_weight={self.margin_weight}, temperature={self.temperature}, "
                f"infonce_weight={self.infonce_weight}")


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of KL(softmax(teacher / t) || softmax(student / t)) over the unmasked candidates."""
    log_student = (student.float() / temperature).masked_fill(~mask, float("-inf")).log_softmax(dim=1)
    log_teacher = (teacher.float() / temperature).masked_fill(~mask, float("-inf")).log_softmax(dim=1)
    terms = log_teacher.exp() * (log_teacher - log_student)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=1).mean()


def margin_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over (query, own hard negative) pairs of ((student margin - teacher margin) / t)^2."""
    b, n = student.shape
    k = n // b - 1
    if k < 1:
        raise ValueError("MarginMSE needs hard negatives (documents after the B positives)")
    rows = torch.arange(b, device=student.device)
    columns = b + rows[:, None] * k + torch.arange(k, device=student.device)[None, :]  # (B, k): own negatives

    def margins(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / temperature
        return scores[rows, rows][:, None] - scores.gather(1, columns)

    kept = mask.gather(1, columns)
    if not kept.any():
        return student.new_zeros((), dtype=torch.float32)
    return (margins(student) - margins(teacher))[kept].pow(2).mean()
