"""The backbone's hidden states for a padded batch, through padded rows or one packed row.

`Embedder.forward` (pooled vectors) and `encode_tokens` (token vectors) both start here, so the two layouts give
the same (B, T, d) states: a packed batch drops the padding before the backbone and restores it after.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from llm2emb.errors import UserError
from llm2emb.model.backbone import decoder_of
from llm2emb.model.packing import pack, unpack


@contextlib.contextmanager
def first_layers(backbone: nn.Module, layers: int | None, pooler) -> Iterator[None]:
    """Run only the first `layers` transformer layers (Matryoshka layers): the rest are not computed.

    The decoder's layer list is swapped for its first `layers` entries for the duration of the block; the final
    norm still runs on the last computed layer, so the result equals a checkpoint loaded with
    `num_hidden_layers=layers` (the Starbucks / 2D Matryoshka recipe). Not thread-safe across concurrent calls on
    the same backbone; under DDP the skipped layers get no gradient (use find_unused_parameters).
    """
    if layers is None:
        yield
        return
    decoder = decoder_of(backbone)
    total = len(decoder.layers)
    if layers == total:
        yield
        return
    if not 1 <= layers <= total:
        raise UserError(f"layers must be between 1 and {total}, got {layers}")
    if pooler.needs_all_layers:
        raise UserError(f"pooling {pooler.name!r} reads every layer; it cannot run with layers={layers}")
    full = decoder.layers
    decoder.layers = nn.ModuleList(list(full)[:layers])
    try:
        yield
    finally:
        decoder.layers = full


def backbone_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, kernel: str,
                    left_padded: bool, future_attention: float = 1.0, every_layer: bool = False):
    """Last hidden states (B, T, d) and, with `every_layer`, each layer's (else None). `kernel` is `padded` or a
    packed one (llm2emb.model.attention); `future_attention` below 1 is the causal-to-bidirectional curriculum's bias,
    which only the padded layout carries."""
    if kernel == "padded":
        return padded_states(backbone, input_ids, attention_mask, left_padded, future_attention, every_layer)
    return packed_states(backbone, input_ids, attention_mask, kernel, every_layer)


def padded_states(backbone, input_ids, attention_mask, left_padded: bool, future_attention: float, every_layer: bool):
    # Positions count real tokens only, so left padding gives the same positions as right padding. Right-padded
    # rows already start at 0: the backbone's default positions (one shared row) are those, and its rotary
    # tables stay (1, T, d) instead of one copy per row.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0) if left_padded else None
    curriculum = {}
    if future_attention < 1.0:
        curriculum["llm2emb_future_bias"] = math.log(future_attention) if future_attention > 0 else -math.inf
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=every_layer, **curriculum)
    return out.last_hidden_state, (out.hidden_states[1:] if every_layer else None)


def packed_states(backbone, input_ids, attention_mask, kernel: str, every_layer: bool):
    """One row of real tokens through the backbone; `cu_seq_lens_*` reach llm2emb.model.attention's varlen kernel."""
    packed = pack(input_ids, attention_mask)
    out = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, output_hidden_states=every_layer,
                   llm2emb_kernel=kernel, **packed.attention_kwargs())
    layers = tuple(unpack(h, packed) for h in out.hidden_states[1:]) if every_layer else None
    return unpack(out.last_hidden_state, packed), layers
