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


# ---- hardness weighting, false-negative masks, Matryoshka views -------------------------------------------


def weighted_ce(pos: float, negatives: list[float], strength: float, t: float = 1.0) -> float:
    """Hardness-weighted InfoNCE by hand: w_n = |N| exp(a s_n) / sum exp(a s_m) multiplies exp(s_n / t)."""
    norm = sum(math.exp(strength * s) for s in negatives)
    weights = [len(negatives) * math.exp(strength * s) / norm for s in negatives]
    return -pos / t + math.log(math.exp(pos / t) + sum(w * math.exp(s / t) for w, s in zip(weights, negatives)))


def test_hardness_weighting_matches_hand_computation():
    docs, doc_ids = torch.cat([P, N]), ids(20, 21, 30, 31)
    loss = InfoNCELoss(temperature=0.5, hardness_weight=2.0)(Q, docs, ids(10, 11), doc_ids)
    q0 = weighted_ce(1, [R, 0, -1], 2.0, t=0.5)
    q1 = weighted_ce(R, [0, 1, 0], 2.0, t=0.5)
    assert loss.item() == pytest.approx((q0 + q1) / 2, rel=1e-6)
    plain = InfoNCELoss(temperature=0.5)(Q, docs, ids(10, 11), doc_ids)
    zero = InfoNCELoss(temperature=0.5, hardness_weight=0.0)(Q, docs, ids(10, 11), doc_ids)
    assert zero.item() == plain.item()
    # Weights average 1 but lean on the high scores, so the negatives' mass (and the loss) grows.
    assert loss.item() > plain.item()


def unit(c: float) -> list[float]:
    """A 2-d unit vector at cosine c to e0."""
    return [c, math.sqrt(1 - c * c)]


def test_hardness_weighting_moves_the_gradient_onto_the_hardest_negative():
    # q = e0; positive at cos 0.9, negatives at cos 0.5 (hard) and -0.5 (easy); |d cos / d doc| is equal for both.
    def share_of_hardest(strength: float) -> float:
        docs = torch.tensor([unit(0.9), unit(0.5), [-0.5, math.sqrt(0.75)]], requires_grad=True)
        InfoNCELoss(temperature=1.0, hardness_weight=strength)(torch.tensor([[1.0, 0.0]]), docs, ids(10), ids(20, 30, 31)).backward()
        norms = docs.grad.norm(dim=1)
        return (norms[1] / (norms[1] + norms[2])).item()

    assert share_of_hardest(0.0) < share_of_hardest(2.0) < share_of_hardest(8.0)


def test_margin_masks_negatives_close_to_the_positive_and_they_do_not_contribute():
    # q0 = e0; positive at cos 0.9; hard negatives at cos 0.96 (>= 0.95 x 0.9 = 0.855: masked) and cos 0.5 (kept).
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([unit(0.9), unit(0.96), unit(0.5)], requires_grad=True)
    fn = InfoNCELoss(temperature=1.0, false_negative_margin=0.95)
    loss = fn(q, docs, ids(10), ids(20, 30, 31))
    assert loss.item() == pytest.approx(ce(0.9, [0.5]), rel=1e-6)
    loss.backward()
    assert docs.grad[1].abs().sum() == 0 and docs.grad[2].abs().sum() > 0
    moved = torch.tensor([unit(0.9), unit(0.99), unit(0.5)])
    assert fn(q, moved, ids(10), ids(20, 30, 31)).item() == loss.item()
    unmasked = InfoNCELoss(temperature=1.0)(q, docs, ids(10), ids(20, 30, 31))
    assert unmasked.item() == pytest.approx(ce(0.9, [0.96, 0.5]), rel=1e-6)


def test_margin_rule_applies_to_in_batch_negatives():
    # p1 scores 0.99 for q0 (positive 1.0): an in-batch false negative under margin 0.95, kept under margin 1.0.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.99, math.sqrt(1 - 0.99**2)]])
    masked = InfoNCELoss(temperature=1.0, false_negative_margin=0.95)(q, p, ids(10, 11), ids(20, 21))
    q1 = ce(math.sqrt(1 - 0.99**2), [0.0])
    assert masked.item() == pytest.approx((ce(1, []) + q1) / 2, rel=1e-6)
    kept = InfoNCELoss(temperature=1.0, false_negative_margin=1.0)(q, p, ids(10, 11), ids(20, 21))
    assert kept.item() == pytest.approx((ce(1, [0.99]) + q1) / 2, rel=1e-6)


def test_guide_masks_negatives_it_scores_above_the_positive():
    # The student sees q0 against p0, n0, n1; the guide thinks n0 is closer to q0 than p0 is: n0 is masked.
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]], requires_grad=True)
    guide_q = torch.tensor([[1.0, 0.0]])
    guide_d = torch.tensor([[0.5, 0.5], [1.0, 0.1], [0.0, 1.0]])
    fn = InfoNCELoss(temperature=1.0)
    loss = fn(q, docs, ids(10), ids(20, 30, 31), guide_queries=guide_q, guide_documents=guide_d)
    assert loss.item() == pytest.approx(ce(0.6, [-0.6]), rel=1e-6)
    loss.backward()
    assert docs.grad[1].abs().sum() == 0 and docs.grad[2].abs().sum() > 0
    moved = docs.detach().clone()
    moved[1] = torch.tensor([0.9, 0.1])
    again = fn(q, moved, ids(10), ids(20, 30, 31), guide_queries=guide_q, guide_documents=guide_d)
    assert again.item() == loss.item()
    unguided = fn(q, docs, ids(10), ids(20, 30, 31))
    assert unguided.item() == pytest.approx(ce(0.6, [0.0, -0.6]), rel=1e-6)
    with pytest.raises(ValueError, match="both"):
        fn(q, docs, ids(10), ids(20, 30, 31), guide_queries=guide_q)


def test_matryoshka_dims_sum_the_losses_of_truncated_embeddings():
    torch.manual_seed(0)
    q, d = torch.randn(4, 8), torch.randn(12, 8)
    qid, did = torch.arange(4), 100 + torch.arange(12)
    plain = InfoNCELoss(temperature=0.1)
    summed = InfoNCELoss(temperature=0.1, views=[(0, 2), (0, 4), (0, 8)])(q, d, qid, did)
    separate = sum(plain(q[:, :k], d[:, :k], qid, did) for k in (2, 4, 8))
    assert summed.item() == pytest.approx(separate.item(), rel=1e-6)
    assert summed.item() != pytest.approx(3 * plain(q, d, qid, did).item())
    with pytest.raises(ValueError, match="exceeds"):
        InfoNCELoss(views=[(0, 16)])(q, d, qid, did)


def test_two_dimensional_matryoshka_views_take_their_own_segment():
    torch.manual_seed(1)
    layer_a, layer_b = torch.randn(4, 8), torch.randn(4, 8)  # queries embedded after k1 and after all layers
    doc_a, doc_b = torch.randn(8, 8), torch.randn(8, 8)
    qid, did = torch.arange(4), 100 + torch.arange(8)
    fn = InfoNCELoss(temperature=0.1, views=[(0, 4), (1, 8)], segments=2)
    got = fn(torch.cat([layer_a, layer_b], dim=1), torch.cat([doc_a, doc_b], dim=1), qid, did)
    plain = InfoNCELoss(temperature=0.1)
    want = plain(layer_a[:, :4], doc_a[:, :4], qid, did) + plain(layer_b, doc_b, qid, did)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="segment"):
        InfoNCELoss(views=[(2, 4)], segments=2)


class _Bag(torch.nn.Module):
    """A small differentiable embedder with dropout: token-embedding mean -> dropout -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.drop = torch.nn.Dropout(0.1)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return self.proj(self.drop((self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)))


@pytest.mark.parametrize(
    "options",
    [
        {"hardness_weight": 3.0},
        {"false_negative_margin": 0.5},
        {"views": [(0, 2), (0, 4), (0, 8)]},
        {"views": [(0, 2), (1, 4)], "segments": 2},
        {"guide": True},
    ],
    ids=["hardness", "margin", "matryoshka", "2d-matryoshka", "guide"],
)
def test_gradcache_with_options_equals_full_batch(options):
    from llm2emb.train.gradcache import gradcache_backward

    options = dict(options)
    guided = options.pop("guide", False)
    torch.manual_seed(0)
    model = _Bag().eval()
    segments = options.get("segments", 1)
    embed = (lambda b: torch.cat([model(b), 2 * model(b)], dim=1)) if segments == 2 else model
    generator = torch.Generator().manual_seed(3)
    batches = [
        {"input_ids": torch.randint(0, 50, (6, 5), generator=generator), "attention_mask": torch.ones(6, 5)},
        {"input_ids": torch.randint(0, 50, (12, 5), generator=generator), "attention_mask": torch.ones(6 * 2, 5)},
    ]
    qid, did = torch.arange(6), 100 + torch.arange(12)
    loss_module = InfoNCELoss(temperature=0.1, learnable_temperature=True, **options)
    guide = _Bag().eval() if guided else None
    extra = {"guide_queries": guide(batches[0]), "guide_documents": guide(batches[1])} if guided else {}

    def loss_fn(embs):
        return loss_module(embs[0], embs[1], qid, did, **{k: v.detach() for k, v in extra.items()})

    full = loss_fn([embed(b) for b in batches])
    full.backward()
    named = list(model.named_parameters()) + [("tau", loss_module.temperature.log_temperature)]
    want = {n: p.grad.clone() for n, p in named}
    for _, p in named:
        p.grad = None
    cached = gradcache_backward(embed, batches, loss_fn, chunk_size=4)
    assert cached.item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in named:
        assert want[name].abs().sum() > 0, name
        assert ((p.grad - want[name]).norm() / want[name].norm()).item() < 1e-5, name
