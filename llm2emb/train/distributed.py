"""Gather a contrastive batch from every process, keeping gradients, so each query sees every device's negatives.

Why the gradient is right without extra scaling: after gathering, every rank holds the same global batch and
computes the same global loss L. The backward of the gather sums the gradient w.r.t. each rank's slice over all
ranks, so rank r receives W * dL/d(its embeddings) (W = world size). DDP then *averages* parameter gradients over
the W ranks, which cancels the factor W and leaves exactly dL/dθ of the single-process full-batch loss.
Parameters that are used only in the loss (a learnable temperature) get the same gradient on every rank, so they
need no synchronisation at all. This works unchanged with GradCache: the gather runs on the cached embeddings.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_processes() -> int:
    """Processes the launcher (torchrun, accelerate launch) started, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is the launcher's rank 0 (the one that writes files and prints), also before the group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_all_processes() -> None:
    """A barrier across the default group (no-op in one process): files one process wrote are there for all."""
    if world_size() > 1:
        dist.barrier()


def end_process_group() -> None:
    """Once every process is done, tear the default group down (no-op without one). accelerate creates the group and
    leaves it open; a process that exits with gloo's threads still running aborts ("terminate called without an
    active exception", exit -6) in about 1 run in 10 of a two-process CPU run, failing a run that had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _gather_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All ranks' tensors (rows may differ per rank), the local one still attached to its autograd graph."""
    longest = max(sizes)
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
    if tensor.requires_grad:
        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
    return [part[:size] for part, size in zip(parts, sizes)]


def gather_batch(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_ids: torch.Tensor,
    document_ids: torch.Tensor,
    in_batch_negatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch in the single-process layout of docs/CONTRACTS.md.

    Queries are concatenated in rank order; documents become [all positives, then all hard negatives], so row
    B + g*k + j is still the j-th negative of global query g. Ranks may hold different numbers of queries (a
    short last batch) but must agree on k; a mismatch raises the same error on every rank instead of hanging.
    """
    local_b = queries.shape[0]
    shape = torch.tensor([local_b, documents.shape[0]], device=queries.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    doc_sizes = [int(s[1]) for s in shapes]
    ks = {n / b for b, n in zip(sizes, doc_sizes) if b}
    if len(ks) > 1:
        counts = sorted(int(r) - 1 for r in ks)
        raise ValueError(f"every process must use the same number of hard negatives per query, got {counts}")

    def split(docs: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return docs[:b], docs[b:]

    all_q = _gather_rows(queries, sizes)
    all_d = _gather_rows(documents, doc_sizes)
    all_qid = _gather_rows(query_ids.unsqueeze(1), sizes)
    all_did = _gather_rows(document_ids.unsqueeze(1), doc_sizes)
    all_flag = _gather_rows(in_batch_negatives.to(torch.long).unsqueeze(1), sizes)

    pos, neg = zip(*(split(d, b) for d, b in zip(all_d, sizes)))
    pos_id, neg_id = zip(*(split(d, b) for d, b in zip(all_did, sizes)))
    return (
        torch.cat(all_q),
        torch.cat(pos + neg),
        torch.cat(all_qid).squeeze(1),
        torch.cat(pos_id + neg_id).squeeze(1),
        torch.cat(all_flag).squeeze(1).bool(),
    )
