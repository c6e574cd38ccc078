"""Packing: a padded batch becomes one row of real tokens with cumulative sequence lengths, and back.

Padding costs compute in every linear layer and in attention; a packed row holds only real tokens, and a
varlen attention kernel (llm2emb.model.attention) keeps each text's attention inside its own span. Packing starts
from the padded batch of docs/CONTRACTS.md and unpacking restores its (B, T, d) layout, so the poolers and
the trainer see exactly what the padded path gives them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packed:
    """One row of real tokens (1, N) and what is needed to attend per text and to restore the padded layout."""

    input_ids: torch.Tensor
    """(1, N) the real tokens of every text, text after text."""
    position_ids: torch.Tensor
    """(1, N) positions restarting at 0 for each text (the same positions the padded path uses)."""
    cu_seqlens: torch.Tensor
    """(B + 1,) int32 offsets of each text in the row: text i is tokens cu_seqlens[i]:cu_seqlens[i+1]."""
    max_length: int
    """The longest text (the varlen kernels' max_seqlen)."""
    indices: torch.Tensor
    """(N,) where each packed token sits in the flattened (B * T) padded batch."""
    shape: tuple[int, int]
    """(B, T) of the padded batch."""

    def attention_kwargs(self) -> dict:
        """Keyword arguments transformers forwards from the model call to every attention function."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Drop the padding of a (B, T) batch, left- or right-padded, keeping the order of texts and tokens."""
    mask = attention_mask.bool()
    indices = mask.flatten().nonzero().squeeze(1)
    lengths = mask.sum(dim=1)
    positions = (mask.long().cumsum(dim=1) - 1).flatten()[indices]
    cu_seqlens = F.pad(lengths.cumsum(dim=0), (1, 0)).to(torch.int32)
    return Packed(
        input_ids=input_ids.flatten()[indices].unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        cu_seqlens=cu_seqlens,
        max_length=int(lengths.max()) if lengths.numel() else 0,
        indices=indices,
        shape=(attention_mask.shape[0], attention_mask.shape[1]),
    )


def unpack(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(1, N, d) packed states -> (B, T, d) in the padded batch's layout, zeros under padding (differentiable)."""
    rows, width = packed.shape
    flat = hidden.new_zeros(rows * width, hidden.shape[-1])
    return flat.index_copy(0, packed.indices, hidden[0]).view(rows, width, -1)


def segment_ids(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: which text it belongs to and its position inside that text."""
    lengths = cu_seqlens.diff().long()
    text = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    position = torch.arange(text.numel(), device=cu_seqlens.device) - cu_seqlens.long()[text]
    return text, position


def block_diagonal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(1, 1, N, N) boolean mask, True where two tokens belong to the same text: packing's attention pattern."""
    text, _ = segment_ids(cu_seqlens)
    return (text[:, None] == text[None, :])[None, None]


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int | None, max_rows: int | None, packed: bool, boundary: int | None = None
) -> Iterator[list[int]]:
    """Consecutive index groups of texts (already sorted by length, longest first) within a token budget.

    A padded batch costs rows x its longest text; a packed one the sum of its lengths. A text longer than
    the budget gets a batch of its own. `max_rows` caps the rows of a batch whatever the budget. No batch holds
    texts longer than `boundary` together with texts that are not (an extended RoPE window, llm2emb.model.rope).
    """
    batch: list[int] = []
    longest = total = 0
    for index, length in enumerate(lengths):
        new_longest, new_total = max(longest, length), total + length
        cost = new_total if packed else new_longest * (len(batch) + 1)
        over_budget = max_tokens is not None and cost > max_tokens
        crossing = boundary is not None and longest > boundary >= length
        if batch and (over_budget or crossing or (max_rows is not None and len(batch) >= max_rows)):
            yield batch
            batch, new_longest, new_total = [], length, length
        batch.append(index)
        longest, total = new_longest, new_total
    if batch:
        yield batch
