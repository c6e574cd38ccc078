"""The late-interaction term of a contrastive stage (`late_interaction:` in a recipe; ColBERT's objective).

The stage trains the pooled vector with InfoNCE as usual and, next to it, the token head (llm2emb.model.late_interaction)
with InfoNCE over normalised Chamfer scores of the same queries and candidates (positive, hard and in-batch
negatives, the same masks): `weight` x that term is added to the loss.

GradCache (train/gradcache.py) and the cross-device gather (train/distributed.py) move one (rows, width) tensor per
side. A row's pooled vector, its token vectors and their mask therefore travel packed side by side,
[pooled (d) | tokens (W x e) | mask (W)], every row padded to the same W tokens (the widest side of the batch);
`LateInteractionTerm.unpack` splits them again inside the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm2emb.model.late_interaction import chamfer_scores


def pack(pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, d), (rows, T, e), (rows, T) -> (rows, d + width x e + width) in float32; T <= width."""
    rows, length, dim = tokens.shape
    if length > width:
        raise ValueError(f"{length} tokens do not fit a packed width of {width}")
    padded = tokens.new_zeros((rows, width, dim))
    padded[:, :length] = tokens
    flags = mask.new_zeros((rows, width), dtype=torch.float32)
    flags[:, :length] = mask.float()
    return torch.cat([pooled.float(), padded.float().flatten(1), flags], dim=1)


class LateInteractionTerm:
    """Unpacks packed embeddings (see the module docstring) and scores the late-interaction term."""

    def __init__(self, pooled_dim: int, token_dim: int, weight: float = 1.0):
        if pooled_dim < 1 or token_dim < 1 or not weight > 0:
            raise ValueError(f"pooled and token dims >= 1 and a positive weight are needed, got {pooled_dim}, "
                             f"{token_dim}, {weight}")
        self.pooled_dim = pooled_dim
        self.token_dim = token_dim
        self.weight = weight

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, d + W x e + W) -> pooled (rows, d), tokens (rows, W, e), mask (rows, W)."""
        rows, total = packed.shape
        width, rest = divmod(total - self.pooled_dim, self.token_dim + 1)
        if rest or width < 1:
            raise ValueError(f"a packed width of {total} does not hold {self.pooled_dim} pooled dims and tokens of "
                             f"{self.token_dim}")
        pooled = packed[:, :self.pooled_dim]
        tokens = packed[:, self.pooled_dim:self.pooled_dim + width * self.token_dim].view(rows, width, self.token_dim)
        return pooled, tokens, packed[:, -width:]

    def loss(self, queries: torch.Tensor, documents: torch.Tensor, logits_of, targets: torch.Tensor) -> torch.Tensor:
        """`weight` x cross-entropy of Chamfer logits; `queries`/`documents` are the token parts (tokens, mask)
        and `logits_of` turns scores (B, N) into masked logits exactly as for the pooled vectors."""
        scores = chamfer_scores(*queries, *documents)
        return self.weight * F.cross_entropy(logits_of(scores), targets)
