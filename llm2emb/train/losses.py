"""InfoNCE over in-batch and hard negatives, the loss of E5, BGE and NV-Embed.

Each query is scored (cosine / temperature) against a set of candidate documents and trained to pick its own
positive. The candidates are: its positive, its k hard negatives, and — when in-batch negatives are on — every
other document of the (possibly multi-device) batch. Document layout follows docs/CONTRACTS.md: B positives,
then B*k hard negatives, row B + i*k + j being the j-th negative of query i.

The computation is split in three steps so later options plug in without a rewrite:
``similarity`` (Matryoshka would call it once per truncated dimension), ``candidate_mask`` (false-negative
margin masking would AND in a score-based mask) and ``logits`` (hardness weighting would add log-weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm2emb.train.distributed import gather_batch, world_size


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


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query over its candidate documents, averaged over queries.

    Embeddings come in unnormalised (``Embedder.forward``); the loss normalises them so scores are cosines.
    Under torch.distributed the batch is gathered from every process first (see ``distributed.py``), so the
    value is the single-process loss of the global batch on every rank.
    """

    def __init__(
        self,
        temperature: float | Temperature = 0.02,
        learnable_temperature: bool = False,
        gather_across_devices: bool = True,
    ):
        super().__init__()
        if not isinstance(temperature, Temperature):
            temperature = Temperature(temperature, learnable=learnable_temperature)
        self.temperature = temperature
        self.gather_across_devices = gather_across_devices

    @staticmethod
    def similarity(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, N), computed in float32 so bf16 embeddings do not coarsen the softmax."""
        q = F.normalize(queries.float(), dim=-1)
        d = F.normalize(documents.float(), dim=-1)
        return q @ d.T

    def logits(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (scores / self.temperature()).masked_fill(~mask, float("-inf"))

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        query_ids: torch.Tensor,
        document_ids: torch.Tensor,
        in_batch_negatives: bool | torch.Tensor = True,
    ) -> torch.Tensor:
        flags = torch.as_tensor(in_batch_negatives, device=queries.device).expand(queries.shape[0])
        if self.gather_across_devices and world_size() > 1:
            queries, documents, query_ids, document_ids, flags = gather_batch(
                queries, documents, query_ids, document_ids, flags
            )
        mask = candidate_mask(query_ids, document_ids, flags)
        logits = self.logits(self.similarity(queries, documents), mask)
        targets = torch.arange(queries.shape[0], device=logits.device)
        return F.cross_entropy(logits, targets)
