"""Two CPU processes (gloo) with DDP give the single-process loss and gradients of the same global batch: plain, with
a teacher's vectors to distil (gathered with the batch), and with late interaction (token vectors packed beside the
pooled ones, gathered as one tensor)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llm2emb.train.distillation import Distillation
from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.late_loss import LateInteractionTerm, pack
from llm2emb.train.losses import InfoNCELoss

B, K, DIM, TEACHER_DIM, TOKENS = 5, 2, 8, 6, 4
MODES = ("plain", "taught", "late")
SPLIT = [3, 2]  # rank 0 holds queries 0-2, rank 1 queries 3-4: unequal, like a short last batch
FLAGS = [True, False]  # rank 1's dataset turns in-batch negatives off


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))


def global_batch():
    torch.manual_seed(1)
    queries = torch.randn(B, DIM)
    documents = torch.randn(B * (1 + K), DIM)
    query_ids = torch.tensor([0, 1, 2, 0, 4])  # query 3 repeats query 0
    document_ids = 100 + torch.arange(B * (1 + K))
    document_ids[4] = 100  # positive of query 4 is the same text as positive of query 0
    flags = torch.tensor([FLAGS[0]] * SPLIT[0] + [FLAGS[1]] * SPLIT[1])
    teacher = {"teacher_queries": torch.randn(B, TEACHER_DIM), "teacher_documents": torch.randn(B * (1 + K), TEACHER_DIM)}
    sides = [{"x": queries}, {"x": documents}]
    for side in sides:  # each row's token inputs and how many of its TOKENS are real
        rows = side["x"].shape[0]
        side["t"] = torch.randn(rows, TOKENS, DIM)
        side["m"] = (torch.arange(TOKENS) < torch.randint(1, TOKENS + 1, (rows, 1))).long()
    return sides, query_ids, document_ids, flags, teacher


def local_batch(rank: int):
    sides, query_ids, document_ids, _, teacher = global_batch()
    start = sum(SPLIT[:rank])
    rows = list(range(start, start + SPLIT[rank]))
    doc_rows = rows + [B + i * K + j for i in rows for j in range(K)]
    teacher = {"teacher_queries": teacher["teacher_queries"][rows],
               "teacher_documents": teacher["teacher_documents"][doc_rows]}
    sides = [{k: v[index] for k, v in side.items()} for side, index in zip(sides, (rows, doc_rows))]
    return sides, query_ids[rows], document_ids[doc_rows], FLAGS[rank], teacher


def make_loss(mode: str) -> InfoNCELoss:
    distillation = Distillation(kl_weight=0.7, margin_weight=0.3, temperature=0.2) if mode == "taught" else None
    late = LateInteractionTerm(DIM, DIM, weight=0.5) if mode == "late" else None
    return InfoNCELoss(temperature=0.1, learnable_temperature=True, distillation=distillation, late_interaction=late)


def step(model, loss_module, batch, chunk_size, no_sync):
    sides, query_ids, document_ids, flags, teacher = batch
    teacher = teacher if loss_module.distillation is not None else {}

    def loss_fn(embs):
        return loss_module(embs[0], embs[1], query_ids, document_ids, flags, **teacher)

    def embed(chunk):
        if loss_module.late_interaction is None:
            return model(chunk["x"])
        tokens = torch.nn.functional.normalize(model(chunk["t"]), dim=-1)
        return pack(model(chunk["x"]), tokens, chunk["m"], TOKENS)

    loss = gradcache_backward(embed, sides, loss_fn, chunk_size, no_sync=no_sync)
    params = [p.grad.clone() for p in model.parameters()] + [
        loss_module.temperature.log_temperature.grad.clone()
    ]
    model.zero_grad()
    loss_module.zero_grad()
    return loss, params


def worker(rank: int, init_file: str, out_dir: str):
    # a timeout makes a stuck rendezvous or collective fail the test instead of hanging CI (seen once in 2026-12)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = DistributedDataParallel(make_model())
        results = {
            (mode, chunk): step(model, make_loss(mode), local_batch(rank), chunk, model.no_sync)
            for mode in MODES
            for chunk in (None, 2)
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Free DDP's reducer while both ranks are still connected: left to the frame's teardown after the group
        # was destroyed, gloo hung there in about 1 run in 5 (2026-12-04, 2 of 8 runs; 0 of 12 with this).
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process(tmp_path, two_workers):
    two_workers(worker, (str(tmp_path / "init"), str(tmp_path)))

    model = make_model()
    want = {mode: step(model, make_loss(mode), global_batch(), None, None) for mode in MODES}
    for mode in ("taught", "late"):  # the teacher's terms and the late-interaction term count
        assert want[mode][0].item() != pytest.approx(want["plain"][0].item(), rel=1e-3)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for (mode, chunk), (loss, grads) in results.items():
            want_loss, want_grads = want[mode]
            assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6), (rank, mode, chunk)
            for got, expected in zip(grads, want_grads):
                assert expected.abs().sum() > 0
                # float32 sums in another order (gloo's reduction) differ by a few ulps of the tensor's scale, not
                # of each (possibly cancelled) element; a missing gathered negative changes gradients by far more.
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
