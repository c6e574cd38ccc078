"""InfoNCE against hand-computed values, duplicate masking, in-batch switch and temperature."""

from __future__ import annotations

import math

import pytest
import torch

from llm2emb.train.losses import InfoNCELoss, Temperature, candidate_mask


def ce(pos: float, others: list[float]) -> float:
    """-log softmax of the positive, by hand."""
    return -pos + math.log(math.exp(pos) + sum(math.exp(o) for o in others))


Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos: q0.p0=1, q0.p1=r, q1.p0=0, q1.p1=r
N = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])  # hard negatives of q0, q1: q0.n0=0, q0.n1=-1, q1.n0=1, q1.n1=0
R = 1 / math.sqrt(2)


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_in_batch_only_matches_hand_computation():
    loss = InfoNCELoss(temperature=1.0)(Q, P, ids(10, 11), ids(20, 21))
    expected = (ce(1, [R]) + ce(R, [0])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hard_negatives_and_temperature_match_hand_computation():
    t = 0.5
    loss = InfoNCELoss(temperature=t)(Q, torch.cat([P, N]), ids(10, 11), ids(20, 21, 30, 31))
    q0 = ce(1 / t, [R / t, 0 / t, -1 / t])
    q1 = ce(R / t, [0 / t, 1 / t, 0 / t])
    assert loss.item() == pytest.approx((q0 + q1) / 2, rel=1e-6)


def test_in_batch_negatives_off_scores_only_own_documents():
    docs = torch.cat([P, N])
    loss = InfoNCELoss(temperature=1.0)(Q, docs, ids(10, 11), ids(20, 21, 30, 31), in_batch_negatives=False)
    assert loss.item() == pytest.approx((ce(1, [0]) + ce(R, [0])) / 2, rel=1e-6)
    with_in_batch = InfoNCELoss(temperature=1.0)(Q, docs, ids(10, 11), ids(20, 21, 30, 31))
    assert with_in_batch.item() != pytest.approx(loss.item())


def test_per_query_in_batch_flags():
    flags = torch.tensor([True, False])
    mask = candidate_mask(ids(10, 11), ids(20, 21, 30, 31), flags)
    assert mask.tolist() == [[True, True, True, True], [False, True, False, True]]


def test_copy_of_the_positive_is_never_a_negative():
    # p1 is the same text as p0: for q0 it must be dropped, for q1 p0 must be dropped.
    docs = torch.cat([P, N])
    loss = InfoNCELoss(temperature=1.0)(Q, docs, ids(10, 11), ids(20, 20, 30, 31))
    q0 = ce(1, [0, -1])  # p1 masked
    q1 = ce(R, [1, 0])  # p0 masked
    assert loss.item() == pytest.approx((q0 + q1) / 2, rel=1e-6)
    distinct = InfoNCELoss(temperature=1.0)(Q, docs, ids(10, 11), ids(20, 21, 30, 31))
    assert distinct.item() != pytest.approx(loss.item())


def test_hard_negative_equal_to_own_positive_is_masked():
    mask = candidate_mask(ids(10, 11), ids(20, 21, 20, 31), torch.tensor(True))
    assert mask.tolist() == [[True, True, False, True], [True, True, True, True]]


def test_repeated_query_does_not_use_the_other_positive():
    mask = candidate_mask(ids(10, 10, 12), ids(20, 21, 22), torch.tensor(True))
    assert mask.tolist() == [[True, False, True], [False, True, True], [True, True, True]]


def test_learnable_temperature_gets_a_gradient():
    loss_fn = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    loss = loss_fn(Q, torch.cat([P, N]), ids(10, 11), ids(20, 21, 30, 31))
    loss.backward()
    grad = loss_fn.temperature.log_temperature.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs() > 0
    assert list(InfoNCELoss(temperature=0.05).parameters()) == []


def test_learnable_temperature_is_clamped():
    temperature = Temperature(0.01, learnable=True, min_value=0.01)
    with torch.no_grad():
        temperature.log_temperature.fill_(math.log(1e-6))
    assert temperature().item() == pytest.approx(0.01)
    with pytest.raises(ValueError):
        Temperature(0.0)


def test_bf16_embeddings_give_float32_loss_and_gradients():
    q = Q.to(torch.bfloat16).requires_grad_()
    loss = InfoNCELoss()(q, P.to(torch.bfloat16), ids(10, 11), ids(20, 21))
    loss.backward()
    assert loss.dtype == torch.float32 and q.grad.dtype == torch.bfloat16


def test_bad_document_count_is_rejected():
    with pytest.raises(ValueError, match="B positives"):
        InfoNCELoss()(Q, torch.cat([P, N[:1]]), ids(10, 11), ids(20, 21, 30))
