"""The pooler contract and its registry: a name in llm2emb.json picks the class, its params rebuild it."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

POOLERS: dict[str, type[Pooler]] = {}


class Pooler(nn.Module):
    """Turns token hidden states into one vector per text, looking only at tokens where `pool_mask` is 1.

    `pool_mask` is the attention mask with the instruction (and tokenizer-added special tokens) removed,
    so instruction tokens never count in the pooled vector.
    """

    name: ClassVar[str]
    trainable: ClassVar[bool] = False
    needs_eos: ClassVar[bool] = False
    """Append EOS to every text: last-token pooling reads the EOS position."""
    needs_all_layers: ClassVar[bool] = False
    """Receive every layer's hidden states, not only the last."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a shared base without a name of its own (LatentBlockPooler) is not a pooler
            POOLERS[cls.name] = cls

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers

    @property
    def output_dim(self) -> int:
        return self.hidden_size

    def params(self) -> dict[str, Any]:
        """Hyperparameters beyond the backbone's shape, saved into llm2emb.json."""
        return {}

    def forward(
        self, hidden_states: torch.Tensor, pool_mask: torch.Tensor, all_layers: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


def masked_mean(hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the pooled tokens; rows with no pooled token give zeros rather than NaN."""
    weights = pool_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)


def as_pooling_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """`"mean"` or `{"type": "mean", ...}` as the dict form (a copy), the one way llm2emb.json stores pooling."""
    return {"type": spec} if isinstance(spec, str) else dict(spec)


def pooler_spec(pooler: Pooler) -> dict[str, Any]:
    return {"type": pooler.name, **pooler.params()}
