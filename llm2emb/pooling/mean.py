"""Mean pooling: the average of the text's token states (NV-Embed's ablation: better than EOS)."""

from llm2emb.pooling.base import Pooler, masked_mean


class MeanPooler(Pooler):
    name = "mean"

    def forward(self, hidden_states, pool_mask, all_layers=None):
        return masked_mean(hidden_states, pool_mask)
