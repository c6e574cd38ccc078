"""Position-weighted mean (SGPT): later tokens have seen more of the text, so they weigh more.

Weights are 1, 2, ..., n over the pooled tokens only, so the instruction and padding shift nothing.
"""

import torch

from llm2emb.pooling.base import Pooler


class WeightedMeanPooler(Pooler):
    name = "weighted_mean"

    def forward(self, hidden_states, pool_mask, all_layers=None):
        mask = pool_mask.to(hidden_states.dtype)
        weights = (torch.cumsum(mask, dim=1) * mask).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
