"""Multi-layer trainable pooling (Tang & Yang 2024): every layer's view of the text, not only the last.

Per-layer masked means (B, L, d) plus a learned layer-position embedding are the context of a
cross-attention from trainable latent queries; an MLP and a mean over the latents give the vector.
The result is added to the last layer's mean through zero-initialised output layers, so an untrained
head equals mean pooling and training learns what the lower layers add.
"""

import torch
from torch import nn

from llm2emb.pooling.base import masked_mean
from llm2emb.pooling.layers import LatentBlockPooler


class MultiLayerPooler(LatentBlockPooler):
    name = "multi_layer"
    needs_all_layers = True

    def __init__(self, hidden_size, num_layers, num_latents=16, num_heads=8, width=None, mlp_mult=2):
        super().__init__(hidden_size, num_layers, num_latents, num_heads, width, mlp_mult)
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, hidden_size))
        self.latent_queries = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)

    def forward(self, hidden_states, pool_mask, all_layers=None):
        if all_layers is None or len(all_layers) != self.num_layers:
            raise ValueError(f"multi_layer pooling needs the {self.num_layers} layers' hidden states")
        per_layer = torch.stack([masked_mean(h, pool_mask) for h in all_layers], dim=1)
        context = per_layer + self.layer_embedding
        queries = self.latent_queries.unsqueeze(0).expand(context.shape[0], -1, -1)
        latents = self.attention(queries, context)
        latents = latents + self.mlp(latents)
        return per_layer[:, -1] + latents.mean(dim=1)
