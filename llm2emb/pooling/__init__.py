"""Poolers, one module each, registered by name in base.POOLERS when their module is imported (here, all of them).

`build_pooler` lives here rather than in base so that it sees every pooler without base importing its own package.
"""

from typing import Any

from llm2emb.errors import UserError
from llm2emb.pooling.base import POOLERS, Pooler, as_pooling_spec, masked_mean, pooler_spec
from llm2emb.pooling.last_token import LastTokenPooler
from llm2emb.pooling.latent_attention import LatentAttentionPooler
from llm2emb.pooling.mean import MeanPooler
from llm2emb.pooling.multi_layer import MultiLayerPooler
from llm2emb.pooling.weighted_mean import WeightedMeanPooler

__all__ = [
    "POOLERS",
    "as_pooling_spec",
    "Pooler",
    "build_pooler",
    "masked_mean",
    "pooler_spec",
    "MeanPooler",
    "LastTokenPooler",
    "WeightedMeanPooler",
    "LatentAttentionPooler",
    "MultiLayerPooler",
]


def build_pooler(spec: str | dict[str, Any], hidden_size: int, num_layers: int) -> Pooler:
    """Build a pooler from `"mean"` or `{"type": "latent_attention", "num_latents": 64, ...}`."""
    spec = as_pooling_spec(spec)
    kind = spec.pop("type", None)
    if kind not in POOLERS:
        raise UserError(f"pooling: unknown type {kind!r}; choose one of {sorted(POOLERS)}")
    try:
        return POOLERS[kind](hidden_size=hidden_size, num_layers=num_layers, **spec)
    except TypeError as exc:
        raise UserError(f"pooling {kind!r}: {exc}") from None
