"""Poolers, one module each, registered by name (see base.POOLERS)."""

from llm2emb.pooling.base import POOLERS, Pooler, build_pooler, masked_mean, pooler_spec
from llm2emb.pooling.last_token import LastTokenPooler
from llm2emb.pooling.latent_attention import LatentAttentionPooler
from llm2emb.pooling.mean import MeanPooler
from llm2emb.pooling.multi_layer import MultiLayerPooler
from llm2emb.pooling.weighted_mean import WeightedMeanPooler

__all__ = [
    "POOLERS",
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
