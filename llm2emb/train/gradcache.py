"""GradCache (Gao et al., 2021): the gradient of a contrastive loss over a large batch with the memory of one chunk.

A contrastive loss couples every row of the batch, so it cannot be split like ordinary gradient accumulation.
GradCache splits the *model* instead: (1) embed every chunk without building a graph, (2) compute the loss on
the full batch of detached embeddings and backpropagate it to them only — this yields dL/d(embedding) for every
row, (3) re-embed each chunk with a graph and backpropagate that cached gradient into the parameters (the
gradient of the surrogate sum(embedding * cached_grad)). Dropout must draw the same masks in (1) and (3), so the
random state is saved before each chunk's first pass and restored for its second.

Hand-written on purpose: the `grad-cache` package is unmaintained and tied to its own model wrapper, and
sentence-transformers' CachedMultipleNegativesRankingLoss only works inside its own loss/model classes; neither
takes an arbitrary ``embed_fn`` (backbone + pooler + adapters) as this does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

Batch = Mapping[str, Any]


def batch_size(batch: Batch) -> int:
    """Rows in a tokenized batch (the first dimension of its tensors)."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


def chunks(batch: Batch, size: int) -> Iterator[dict[str, Any]]:
    """Consecutive row slices of every tensor in ``batch``, each cut to the columns its own rows use (a chunk of
    short texts does not carry the longest text's padding through the model twice); other values pass unchanged."""
    for start in range(0, batch_size(batch), size):
        yield trim_padding({k: v[start : start + size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` without the columns no row attends to (trailing with right padding, leading with left padding),
    cut from every (rows, columns) tensor of the attention mask's width."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not mask.any():
        return batch
    used = mask.any(dim=0).nonzero().flatten()
    first, last, width = int(used[0]), int(used[-1]) + 1, mask.shape[1]
    if first == 0 and last == width:
        return batch
    return {k: v[:, first:last] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width else v
            for k, v in batch.items()}


class RandomState:
    """The CPU and CUDA generator states at one moment, to replay a forward pass with the same dropout."""

    def __init__(self, batch: Batch):
        self.cpu = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*batch.values())

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the saved state, then put the generators back where they were."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.device_states)
            yield


def gradcache_backward(
    embed_fn: Callable[[dict[str, Any]], torch.Tensor],
    batches: Sequence[Batch],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    chunk_size: int | None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn([embed_fn(b) for b in batches])``; return the loss.

    ``batches`` are embedded separately (queries, documents) and chunked by rows. ``backward`` runs the loss's
    backward (pass ``accelerator.backward`` so mixed-precision loss scaling applies; the cached gradients then
    carry the scale into the parameters). ``no_sync`` wraps every parameter backward except the last, so DDP
    all-reduces once per step. Without a chunk size, or when it covers every batch, this is one plain forward
    and backward. ``loss_fn`` may raise to stop before any gradient is written.
    """
    if chunk_size is None or all(batch_size(b) <= chunk_size for b in batches):
        loss = loss_fn([embed_fn(dict(b)) for b in batches])
        backward(loss)
        return loss.detach()

    pieces = [list(chunks(b, chunk_size)) for b in batches]
    states = [[] for _ in batches]
    cached = []
    with torch.no_grad():
        for piece, state in zip(pieces, states):
            parts = []
            for chunk in piece:
                state.append(RandomState(chunk))
                parts.append(embed_fn(chunk))
            cached.append(torch.cat(parts).detach().requires_grad_())

    loss = loss_fn(cached)
    backward(loss)

    work = [
        (chunk, state, grad)
        for piece, state_list, emb in zip(pieces, states, cached)
        for chunk, state, grad in zip(piece, state_list, emb.grad.split(chunk_size))
    ]
    for index, (chunk, state, grad) in enumerate(work):
        sync = contextlib.nullcontext if index == len(work) - 1 else no_sync
        with sync(), state.replay():
            embedding = embed_fn(chunk)
            embedding.backward(gradient=grad.to(embedding.dtype))
    return loss.detach()
