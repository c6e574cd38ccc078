"""Losses for graded pairs (STS-style 0-5 scores): CoSENT and AnglE, so scored data keeps its grades.

InfoNCE needs positives, so a scored pair would have to be thresholded into "positive" or dropped, throwing away
the order between a 3.8 and a 2.0 pair. CoSENT (Su 2022) trains that order directly: for every two pairs (i, j) of
the batch whose gold scores say i is more similar than j, it penalises cos_j > cos_i through

    loss = log(1 + sum over s_i > s_j of exp((cos_j - cos_i) / temperature))

AnglE (Li and Li 2023, "AnglE-optimized text embeddings") adds the same ranking on an angle measured in complex space,
whose gradient does not vanish where the cosine saturates: each embedding is read as a complex vector (first half real
parts, second half imaginary parts), z / w is taken dimension by dimension over the squared norm of the whole of w
(as the reference implementation, angle-emb's `angle_loss`, does), normalised by |z| / |w|, and the magnitude of the
sum of its real plus imaginary parts is the pair's angle alignment. That sum is the real cosine of the two embeddings
plus sum(b c - a d) / (|z| |w|), so it stays within sqrt(2), on the cosine's scale, and one temperature serves both.
`loss: angle` is CoSENT on the cosine plus `angle_weight` x CoSENT on the angle alignment. (Until 2026-12 the quotient
was divided dimension by dimension, which gave values above 1 and gradients about 44x the reference's on 576-d vectors.)

Both rank pairs within one process's batch (no gathering: a pair's score is only comparable with pairs seen
together, and every process already sees whole pairs). Hand-written: no maintained library exposes these losses
over llm2emb's batch layout with GradCache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm2emb.train.losses import Temperature

GRADED_LOSSES = ("cosent", "angle")


def ranking_loss(values: torch.Tensor, scores: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """log(1 + sum over (i, j) with scores_i > scores_j of exp(scale * (values_j - values_i))): values should follow
    the scores' order."""
    gaps = scale * (values[None, :] - values[:, None])  # [i, j] = scale * (values_j - values_i)
    ordered = scores[:, None] > scores[None, :]
    terms = gaps.masked_fill(~ordered, float("-inf")).flatten()
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def angle_alignment(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B,) AnglE's angle term of each pair of embeddings read as complex vectors z, w (real half, imaginary half):
    |sum over dimensions of Re + Im of (z_k / w_k, over |w|^2 instead of |w_k|^2) / (|z| / |w|)|, as angle-emb
    computes it; equal vectors give 1."""
    if left.shape[-1] % 2:
        raise ValueError(f"the angle loss reads embeddings as complex numbers and needs an even width, got {left.shape[-1]}")
    a, b = left.float().chunk(2, dim=-1)
    c, d = right.float().chunk(2, dim=-1)
    # sum_k (a c + b d + b c - a d) / |w|^2 / (|z| / |w|) = that sum / (|z| |w|)
    norms = left.float().norm(dim=-1) * right.float().norm(dim=-1)
    return ((a * c + b * d + b * c - a * d).sum(dim=-1) / norms.clamp_min(1e-12)).abs()


class GradedPairLoss(nn.Module):
    """CoSENT (or AnglE) over a batch of (sentence1, sentence2, score) rows; the scale is 1 / temperature.

    Called like `InfoNCELoss` by `ContrastiveTrainer` (queries are the first sentences, documents the second ones),
    with the rows' gold `scores`; ids and in-batch flags are not used (every pair is compared with every other).
    """

    chance = None
    """A ranking loss has no loss level at uniform scores to compare with (InfoNCELoss.chance): the collapse guard
    watches the cosine alone."""

    def __init__(self, kind: str = "cosent", temperature: float | Temperature = 0.05, angle_weight: float = 1.0):
        super().__init__()
        if kind not in GRADED_LOSSES:
            raise ValueError(f"graded loss must be one of {GRADED_LOSSES}, got {kind!r}")
        self.kind = kind
        self.temperature = temperature if isinstance(temperature, Temperature) else Temperature(temperature)
        self.angle_weight = angle_weight

    def forward(self, queries, documents, query_ids=None, document_ids=None, in_batch_negatives=True,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        if scores is None:
            raise ValueError(f"loss {self.kind} needs the rows' gold scores (a scored_pairs dataset)")
        if documents.shape[0] != queries.shape[0]:
            raise ValueError(f"loss {self.kind} takes one second sentence per pair, got {documents.shape[0]} for "
                             f"{queries.shape[0]} pairs (set hard_negatives: 0)")
        scale = 1.0 / self.temperature()
        scores = scores.to(queries.device)
        cosine = F.cosine_similarity(queries.float(), documents.float(), dim=-1)
        loss = ranking_loss(cosine, scores, scale)
        if self.kind == "angle":
            loss = loss + self.angle_weight * ranking_loss(angle_alignment(queries, documents), scores, scale)
        return loss
