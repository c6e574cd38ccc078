"""Late interaction (ColBERT): one small vector per token, documents scored by Chamfer (MaxSim) similarity.

The backbone's last hidden states are wide (576 for SmolLM2-135M, 3,584 for Qwen2.5-7B): kept per token, as
multi-vector retrieval keeps them, they cost a document hundreds of kilobytes. ColBERT projects each token state to
128 dimensions with a linear head trained by a late-interaction loss; `TokenHead` is that head, saved in a model
folder as `token_head.safetensors` beside `token_dim` in llm2emb.json (a folder without one gives the token states
as they are). `chamfer_scores` is the differentiable score the loss trains (llm2emb.train.losses); retrieval with it,
exact or through MUVERA's fixed-dimensional encodings, is in llm2emb.retrieval.muvera.

Written here rather than taken from a library: PyLate and RAGatouille carry ColBERT's head and loss inside their own
model classes (a BERT-style encoder with its own tokenizer handling), which cannot wrap an llm2emb backbone, its
prompts and its pooling mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_HEAD_WEIGHTS_NAME = "token_head.safetensors"
CHAMFER_QUERY_ROWS = 16
"""Queries scored at once in `chamfer_scores`: bounds the transient (rows, documents, Tq, Td) similarity tensor."""


class TokenHead(nn.Module):
    """Token states (..., hidden) -> late-interaction vectors (..., dim), normalised (cosines, as ColBERT)."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"token dim must be at least 1, got {dim}")
        self.projection = nn.Linear(hidden_size, dim, bias=False)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        vectors = self.projection(hidden.to(self.projection.weight.dtype))
        return F.normalize(vectors.float(), dim=-1)


def chamfer_scores(queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor,
                   document_mask: torch.Tensor) -> torch.Tensor:
    """Normalised Chamfer similarity (Bq, Bd): for each query token its best document token's inner product,
    averaged over the query's tokens.

    `queries` (Bq, Tq, e), `documents` (Bd, Td, e); the masks (B, T) mark real tokens. The average (MUVERA's NChamfer)
    instead of ColBERT's sum keeps scores in cosine range, so the stage's temperature means what it means for single
    vectors; a query's ranking of documents is the same either way. A document without tokens scores -inf.
    """
    real = query_mask.bool()
    blocked = ~document_mask.bool()
    counts = real.sum(dim=1).clamp_min(1).to(queries.dtype)
    rows = []
    for start in range(0, queries.shape[0], CHAMFER_QUERY_ROWS):
        block = slice(start, start + CHAMFER_QUERY_ROWS)
        similarity = torch.einsum("qte,dse->qdts", queries[block], documents)
        best = similarity.masked_fill(blocked[None, :, None, :], float("-inf")).amax(dim=-1)  # (q, d, Tq)
        best = torch.where(real[block, None, :], best, torch.zeros_like(best))
        rows.append(best.sum(dim=-1) / counts[block, None])
    return torch.cat(rows)
