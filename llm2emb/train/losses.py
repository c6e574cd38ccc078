"""InfoNCE over in-batch and hard negatives, the loss of E5, BGE and NV-Embed, with the literature's options.

Each query is scored (cosine / temperature) against a set of candidate documents and trained to pick its own
positive. The candidates are: its positive, its k hard negatives, and — when in-batch negatives are on — every
other document of the (possibly multi-device) batch. Document layout follows docs/CONTRACTS.md: B positives,
then B*k hard negatives, row B + i*k + j being the j-th negative of query i.

Options (each off by default, each leaving the plain loss unchanged when off):

- ``hardness_weight`` α (KaLM-Embedding-V2, RzenEmbed; Robinson et al. 2021): every negative n of query i is
  weighted by w_in = |N_i| * softmax_n(α * s_in), computed without gradient. The weights average 1 over a query's
  negatives, so α = 0 is plain InfoNCE and α > 0 moves the softmax mass (and the gradient) onto hard negatives.
  They enter as log-weights added to the logits: w * exp(s / τ) = exp(s / τ + log w).
- ``false_negative_margin`` m: a negative whose score is >= m x the positive's score is masked out (the
  positive-aware rule of NV-Retriever), applied to in-batch and hard negatives alike.
- a guide (GISTEmbed): with ``guide_queries``/``guide_documents`` (a frozen model's embeddings of the same
  batch), a negative the guide scores above the query's positive is masked out.
- a teacher (distillation): with ``teacher_queries``/``teacher_documents`` (a frozen teacher's embeddings of the
  same texts, any width) and ``distillation`` (`llm2emb.train.distillation.Distillation`), the student's scores
  also learn the teacher's (KL and/or MarginMSE per view), and InfoNCE is weighted by its ``infonce_weight``.
- Matryoshka views: ``views`` lists (segment, dim) pairs; the loss is the sum of the loss over every view, where
  a view takes embedding segment ``segment`` (packed side by side, see ``split_segments``) and keeps its first
  ``dim`` components, renormalised (MRL: one segment, many dims; 2D Matryoshka/Starbucks: one segment per
  layer count). Masks from margins and hardness weights are computed per view from that view's own scores.
- late interaction: with ``late_interaction`` (`llm2emb.train.late_loss.LateInteractionTerm`), each embedding row
  carries the text's token vectors packed beside its pooled vector, and the same candidates are also scored by
  normalised Chamfer similarity (ColBERT), with the same masks and temperature.

After each forward, ``chance`` holds the loss the batch would have if every candidate scored the same (ln of each
query's candidate count, averaged, summed over the loss's cross-entropy terms): the collapse guard's reference
(llm2emb.train.collapse). None with distillation, whose KL term has no such fixed level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm2emb.train.distillation import Distillation
from llm2emb.train.distributed import gather_batch, world_size
from llm2emb.train.late_loss import LateInteractionTerm


class Temperature(nn.Module):
    """The softmax temperature τ, held as log τ so a learnable τ stays positive and moves multiplicatively.

    A learnable τ is clamped from below (as CLIP clamps its logit scale) because nothing else stops it from
    collapsing towards 0 and blowing up the logits.
    """

    def __init__(self, value: float = 0.02, learnable: bool = False, min_value: float = 1e-3):
        super().__init__()
        if not value > 0:
            raise ValueError(f"temperature must be positive, got {value}")
        if learnable and value < min_value:
            raise ValueError(f"a learnable temperature starts at or above {min_value}, got {value}")
        log_value = torch.tensor(math.log(value), dtype=torch.float32)
        self.learnable = learnable
        self.min_value = min_value
        if learnable:
            self.log_temperature = nn.Parameter(log_value)
        else:
            self.register_buffer("log_temperature", log_value)

    def forward(self) -> torch.Tensor:
        value = self.log_temperature.exp()
        return value.clamp(min=self.min_value) if self.learnable else value

    def extra_repr(self) -> str:
        return f"value={self().detach().item():.4g}, learnable={self.learnable}"


def candidate_mask(
    query_ids: torch.Tensor, document_ids: torch.Tensor, in_batch_negatives: torch.Tensor
) -> torch.Tensor:
    """Bool (B, N): True where document n may appear in the softmax of query i.

    A document is left out when it is a copy of query i's positive (same text id) or a positive of another
    occurrence of the same query text: neither is a real negative. With in-batch negatives off for query i,
    only its own positive and its own k hard negatives remain.
    """
    b, n = query_ids.shape[0], document_ids.shape[0]
    if b == 0 or n % b:
        raise ValueError(f"expected B positives then B*k negatives, got {b} queries and {n} documents")
    k = n // b - 1
    rows = torch.arange(b, device=document_ids.device)
    cols = torch.arange(n, device=document_ids.device)
    positive = cols[None, :] == rows[:, None]
    own_negative = (cols[None, :] >= b + rows[:, None] * k) & (cols[None, :] < b + (rows[:, None] + 1) * k)

    copy_of_positive = document_ids[None, :] == document_ids[:b, None]
    same_query = torch.zeros_like(positive)
    same_query[:, :b] = query_ids[None, :] == query_ids[:, None]
    mask = ~(copy_of_positive | same_query) | positive

    in_batch = in_batch_negatives.to(device=mask.device, dtype=torch.bool).expand(b)
    return mask & (in_batch[:, None] | positive | own_negative)


def positive_mask(b: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool (B, N): True at (i, i), the column of query i's own positive."""
    return torch.eye(b, n, dtype=torch.bool, device=device)


def margin_mask(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Bool (B, N): False on negatives scoring at least ``margin`` x the query's positive score (likely false
    negatives); the positive itself is always kept."""
    b, n = scores.shape
    positive = scores.diagonal()[:, None]
    return (scores < margin * positive) | positive_mask(b, n, scores.device)


def guide_mask(guide_scores: torch.Tensor) -> torch.Tensor:
    """Bool (B, N): False on negatives the guide scores above the query's positive (GISTEmbed)."""
    b, n = guide_scores.shape
    return (guide_scores <= guide_scores.diagonal()[:, None]) | positive_mask(b, n, guide_scores.device)


def hardness_log_weights(scores: torch.Tensor, mask: torch.Tensor, strength: float) -> torch.Tensor:
    """log w (B, N) of the hardness weights w_in = |N_i| softmax_n(strength * s_in) over each query's negatives.

    Zero on the positive and on masked columns (and for a query without negatives); no gradient flows through it.
    """
    b, n = scores.shape
    negatives = mask & ~positive_mask(b, n, scores.device)
    count = negatives.sum(dim=1, keepdim=True)
    z = (strength * scores.detach()).masked_fill(~negatives, float("-inf"))
    log_w = z - z.logsumexp(dim=1, keepdim=True) + count.clamp_min(1).log()
    return torch.where(negatives & (count > 0), log_w, torch.zeros_like(log_w))


def split_segments(embeddings: torch.Tensor, segments: int) -> list[torch.Tensor]:
    """(B, S*d) -> S tensors (B, d): several embeddings of each row packed side by side (one per layer count)."""
    if embeddings.shape[-1] % segments:
        raise ValueError(f"embedding width {embeddings.shape[-1]} is not a multiple of {segments} segments")
    return list(embeddings.chunk(segments, dim=-1))


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query over its candidate documents, averaged over queries (summed over views).

    Embeddings come in unnormalised (``Embedder.forward``); the loss normalises them so scores are cosines.
    Under torch.distributed the batch is gathered from every process first (see ``distributed.py``), so the
    value is the single-process loss of the global batch on every rank. See the module docstring for
    ``hardness_weight``, ``false_negative_margin``, the guide and ``views``/``segments``.
    """

    def __init__(
        self,
        temperature: float | Temperature = 0.02,
        learnable_temperature: bool = False,
        gather_across_devices: bool = True,
        hardness_weight: float = 0.0,
        false_negative_margin: float | None = None,
        views: list[tuple[int, int | None]] | None = None,
        segments: int = 1,
        distillation: Distillation | None = None,
        late_interaction: LateInteractionTerm | None = None,
    ):
        super().__init__()
        if not isinstance(temperature, Temperature):
            temperature = Temperature(temperature, learnable=learnable_temperature)
        if hardness_weight < 0:
            raise ValueError(f"hardness_weight must be >= 0, got {hardness_weight}")
        views = list(views) if views else [(0, None)]
        if segments < 1 or any(not 0 <= seg < segments or (dim is not None and dim < 1) for seg, dim in views):
            raise ValueError(f"views {views} do not fit {segments} segment(s) of positive dims")
        self.temperature = temperature
        self.gather_across_devices = gather_across_devices
        self.hardness_weight = hardness_weight
        self.false_negative_margin = false_negative_margin
        self.views = views
        self.segments = segments
        self.distillation = distillation
        self.late_interaction = late_interaction
        self.chance: torch.Tensor | None = None

    def chance_level(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The loss at uniform scores over `mask`'s candidates (see the module docstring); None with distillation."""
        if self.distillation is not None:
            return None
        terms = len(self.views) + (self.late_interaction.weight if self.late_interaction is not None else 0.0)
        return terms * mask.sum(dim=1).float().log().mean().detach()

    @staticmethod
    def similarity(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, N), computed in float32 so bf16 embeddings do not coarsen the softmax."""
        q = F.normalize(queries.float(), dim=-1)
        d = F.normalize(documents.float(), dim=-1)
        return q @ d.T

    def logits(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.false_negative_margin is not None:
            mask = mask & margin_mask(scores.detach(), self.false_negative_margin)
        logits = scores / self.temperature()
        if self.hardness_weight:
            logits = logits + hardness_log_weights(scores, mask, self.hardness_weight)
        return logits.masked_fill(~mask, float("-inf"))

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        query_ids: torch.Tensor,
        document_ids: torch.Tensor,
        in_batch_negatives: bool | torch.Tensor = True,
        guide_queries: torch.Tensor | None = None,
        guide_documents: torch.Tensor | None = None,
        teacher_queries: torch.Tensor | None = None,
        teacher_documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        flags = torch.as_tensor(in_batch_negatives, device=queries.device).expand(queries.shape[0])
        guided = guide_queries is not None
        if guided != (guide_documents is not None):
            raise ValueError("pass both guide_queries and guide_documents, or neither")
        taught = teacher_queries is not None
        if taught != (teacher_documents is not None) or taught != (self.distillation is not None):
            raise ValueError("a loss with distillation takes teacher_queries and teacher_documents, one without none")
        if self.gather_across_devices and world_size() > 1:
            if guided:
                guide_queries, guide_documents, *_ = gather_batch(
                    guide_queries, guide_documents, query_ids, document_ids, flags
                )
            if taught:
                teacher_queries, teacher_documents, *_ = gather_batch(
                    teacher_queries, teacher_documents, query_ids, document_ids, flags
                )
            queries, documents, query_ids, document_ids, flags = gather_batch(
                queries, documents, query_ids, document_ids, flags
            )
        late = self.late_interaction
        if late is not None:
            queries, *query_tokens = late.unpack(queries)
            documents, *document_tokens = late.unpack(documents)
        mask = candidate_mask(query_ids, document_ids, flags)
        self.chance = self.chance_level(mask)
        if guided:
            mask = mask & guide_mask(self.similarity(guide_queries, guide_documents))
        teacher_scores = self.similarity(teacher_queries, teacher_documents) if taught else None
        infonce_weight = self.distillation.infonce_weight if taught else 1.0
        query_parts = split_segments(queries, self.segments)
        document_parts = split_segments(documents, self.segments)
        targets = torch.arange(queries.shape[0], device=queries.device)
        loss = queries.new_zeros((), dtype=torch.float32)
        for segment, dim in self.views:
            q, d = query_parts[segment], document_parts[segment]
            if dim is not None:
                if dim > q.shape[-1]:
                    raise ValueError(f"Matryoshka dim {dim} exceeds the embedding width {q.shape[-1]}")
                q, d = q[:, :dim], d[:, :dim]
            scores = self.similarity(q, d)
            if infonce_weight:
                loss = loss + infonce_weight * F.cross_entropy(self.logits(scores, mask), targets)
            if taught:
                loss = loss + self.distillation(scores, teacher_scores, mask)
        if late is not None:
            loss = loss + late.loss(query_tokens, document_tokens, lambda scores: self.logits(scores, mask), targets)
        return loss
