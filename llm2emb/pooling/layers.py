"""Building blocks of the trainable poolers.

Written here rather than taken from a library: NV-Embed's and Tang & Yang's heads are small, and
neither ships as a maintained package that works on current transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from llm2emb.errors import UserError
from llm2emb.pooling.base import Pooler


class CrossAttention(nn.Module):
    """Multi-head attention from `queries` (B, Tq, d) to `context` (B or 1, Tk, d), pre-normalised."""

    def __init__(self, dim: int, num_heads: int, inner_dim: int):
        super().__init__()
        if inner_dim % num_heads:
            raise UserError(f"pooling width {inner_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        nn.init.zeros_(self.to_out.weight)  # an untrained head adds nothing: training starts from the residual

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.to_q(self.norm_q(queries)))
        k, v = self.to_kv(self.norm_kv(context)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class GEGLUFeedForward(nn.Module):
    """Pre-normalised GEGLU MLP (NV-Embed's latent-attention block)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class LatentBlockPooler(Pooler):
    """The trainable poolers built from one cross-attention and one GEGLU MLP (latent attention, multi-layer): their
    shared shape, hyperparameters and saved `params`; each adds its latents and its own forward."""

    trainable = True

    def __init__(self, hidden_size, num_layers, num_latents, num_heads, width, mlp_mult):
        super().__init__(hidden_size, num_layers)
        self.num_latents, self.num_heads, self.mlp_mult = num_latents, num_heads, mlp_mult
        self.width = width or hidden_size
        self.attention = CrossAttention(hidden_size, num_heads, self.width)
        self.mlp = GEGLUFeedForward(hidden_size, mlp_mult)

    def params(self):
        return {"num_latents": self.num_latents, "num_heads": self.num_heads, "width": self.width,
                "mlp_mult": self.mlp_mult}
