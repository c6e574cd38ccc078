"""llm2emb's poolers as one sentence-transformers module, copied verbatim into exported folders.

This file is what `llm2emb export --format sentence-transformers` ships beside the weights when the pooling has no
sentence-transformers equivalent (latent attention, multi-layer, SGPT weighted mean): the folder then loads with
`SentenceTransformer(path, trust_remote_code=True)` and nothing else installed. It therefore imports only torch and
sentence-transformers, never llm2emb; tests/test_export.py checks that its vectors equal `Embedder`'s, so it cannot
drift from llm2emb/pooling/.

The pool mask is rebuilt from what sentence-transformers passes: the attention mask minus the tokenizer's added
special tokens at the start and minus the prompt (the instruction prefix). sentence-transformers measures a prompt by
tokenizing it alone (`prompt_length`), which counts the template's trailing space as a token of its own, while in
the joined text that space merges into the first word, which llm2emb pools. For the exported query prompt the module
knows the prompt's token ids and leaves out only the tokens the joined text shares with them, exactly what llm2emb
leaves out; any other prompt falls back to `prompt_length`.
"""

from __future__ import annotations

import torch
from sentence_transformers.base.modules import Module
from torch import nn
from torch.nn import functional as F


def masked_mean(hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    weights = pool_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, inner_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

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
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class Llm2EmbPooling(Module):
    """Pooling `type` (latent_attention, multi_layer or weighted_mean) with llm2emb's hyperparameters."""

    config_keys = ["pooling", "hidden_size", "num_layers", "num_special_prefix", "prompt_ids"]

    def __init__(self, pooling: dict, hidden_size: int, num_layers: int, num_special_prefix: int = 0,
                 prompt_ids: list[int] | None = None):
        super().__init__()
        self.pooling, self.hidden_size, self.num_layers = dict(pooling), hidden_size, num_layers
        self.num_special_prefix, self.prompt_ids = num_special_prefix, list(prompt_ids or [])
        kind = self.pooling["type"]
        if kind == "latent_attention":
            self.latents = nn.Parameter(torch.zeros(self.pooling["num_latents"], hidden_size))
        elif kind == "multi_layer":
            self.layer_embedding = nn.Parameter(torch.zeros(num_layers, hidden_size))
            self.latent_queries = nn.Parameter(torch.zeros(self.pooling["num_latents"], hidden_size))
        elif kind != "weighted_mean":
            raise ValueError(f"unsupported pooling type {kind!r}")
        if kind != "weighted_mean":
            self.attention = CrossAttention(hidden_size, self.pooling["num_heads"], self.pooling["width"])
            self.mlp = GEGLUFeedForward(hidden_size, self.pooling["mlp_mult"])

    def get_embedding_dimension(self) -> int:
        return self.hidden_size

    def _prompt_tokens(self, ids: list[int], prompt_length: int) -> int:
        """How many leading tokens of one row belong to the prompt (see the module docstring)."""
        known = self.prompt_ids
        if prompt_length != len(known) or ids[: prompt_length - 1] != known[:-1]:
            return prompt_length
        shared = 0
        while shared < len(known) and shared < len(ids) and ids[shared] == known[shared]:
            shared += 1
        return shared

    def _pool_mask(self, features: dict) -> torch.Tensor:
        mask = features["attention_mask"].clone()
        prompt_length = int(features.get("prompt_length") or 0)
        first = mask.argmax(dim=1)  # first real token, whatever the padding side
        skip = torch.full_like(first, self.num_special_prefix)
        if prompt_length:  # counts the special prefix too
            prompt_length -= self.num_special_prefix
            for row, start in enumerate((first + self.num_special_prefix).tolist()):
                ids = features["input_ids"][row, start : start + prompt_length + 1].tolist()
                skip[row] += self._prompt_tokens(ids, prompt_length)
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        mask[positions < (first + skip).unsqueeze(1)] = 0
        return mask

    def forward(self, features: dict, **kwargs) -> dict:
        hidden = features["token_embeddings"]
        pool_mask = self._pool_mask(features)
        kind = self.pooling["type"]
        if kind == "weighted_mean":
            mask = pool_mask.to(hidden.dtype)
            weights = (torch.cumsum(mask, dim=1) * mask).unsqueeze(-1)
            vector = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        elif kind == "latent_attention":
            x = hidden + self.attention(hidden, self.latents.unsqueeze(0))
            x = x + self.mlp(x)
            vector = masked_mean(x, pool_mask)
        else:
            layers = features["all_layer_embeddings"][1:]  # [0] is the embedding layer
            per_layer = torch.stack([masked_mean(h, pool_mask) for h in layers], dim=1)
            context = per_layer + self.layer_embedding
            queries = self.latent_queries.unsqueeze(0).expand(context.shape[0], -1, -1)
            latents = self.attention(queries, context)
            latents = latents + self.mlp(latents)
            vector = per_layer[:, -1] + latents.mean(dim=1)
        features["sentence_embedding"] = vector
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> Llm2EmbPooling:
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**config)
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub)
        return module
