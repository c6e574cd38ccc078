"""Losses for graded pairs (STS-style 0-5 scores): CoSENT and AnglE, so scored data keeps its grades.

InfoNCE needs positives, so a scored pair would have to be thresholded into "positive" or dropped, throwing away
the order between a 3.8 and a 2.0 pair. CoSENT (Su 2022) trains that order directly: for every two pairs (i, j) of
the batch whose gold scores say i is more similar than j, it penalises cos_j > cos_i through

    loss = log(1 + sum over s_i > s_j of exp((cos_j - cos_i) / temperature))

AnglE (Li and Li 2023, "AnglE-optimized text embeddings") adds the same ranking on an angle measured in complex space,
whose gradient does not vanish where the cosine saturates: each embedding is read as complex numbers (first half real
parts, second half imaginary parts), the pair's quotient z / w is taken dimension by dimension and normalised by
|z| / |w|, and the magnitude of the mean of its real plus imaginary parts is the pair's angle alignment (1 for equal
vectors, the quotient then being 1 everywhere); pairs with higher gold scores must be better aligned. AnglE sums over
dimensions; the mean keeps the term on the cosine's scale, so one temperature serves both. `loss: angle` is CoSENT on
the cosine plus `angle_weight` x CoSENT on the angle alignment.

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
    """(B,) AnglE's angle term of each pair of embeddings read as complex vectors (real half, imaginary half):
    |mean over dimensions of Re + Im of (z / w) / (|z| / |w|)|, 1 for equal vectors."""
    if left.shape[-1] % 2:
        raise ValueError(f"the angle loss reads embeddings as complex numbers and needs an even width, got {left.shape[-1]}")
    a, b = left.float().chunk(2, dim=-1)
    c, d = right.float().chunk(2, dim=-1)
    modulus = (c * c + d * d).clamp_min(1e-12)
    real = (a * c + b * d) / modulus  # (a + bi) / (c + di), dimension by dimension
    imaginary = (b * c - a * d) / modulus
    ratio = left.float().norm(dim=-1, keepdim=True) / right.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ((real + imaginary) / ratio.clamp_min(1e-12)).mean(dim=-1).abs()


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
