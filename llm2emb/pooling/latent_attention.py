"""NV-Embed latent-attention pooling (Lee et al. 2024).

Each token's hidden state is a query over `num_latents` trainable latent vectors (keys = values),
multi-head; a GEGLU MLP follows; then a masked mean over the text tokens. Both blocks are residual
with zero-initialised output layers, so an untrained head equals mean pooling and training only moves
it from there. NV-Embed used 512 latents and 8 heads at width 4096; `width` and `num_latents` scale it
down for small models.
"""

import torch
from torch import nn

from llm2emb.pooling.base import masked_mean
from llm2emb.pooling.layers import LatentBlockPooler


class LatentAttentionPooler(LatentBlockPooler):
    name = "latent_attention"

    def __init__(self, hidden_size, num_layers, num_latents=512, num_heads=8, width=None, mlp_mult=4):
        super().__init__(hidden_size, num_layers, num_latents, num_heads, width, mlp_mult)
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)

    def forward(self, hidden_states, pool_mask, all_layers=None):
        x = hidden_states + self.attention(hidden_states, self.latents.unsqueeze(0))
        x = x + self.mlp(x)
        return masked_mean(x, pool_mask)
