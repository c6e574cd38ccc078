"""MUVERA: FDE inner products never exceed Chamfer (no projection), approach it within the paper's bound as k_sim
grows, and FDE search with a full shortlist equals exact late-interaction ranking."""

import math

import numpy as np
import pytest

from llm2emb.errors import UserError
from llm2emb.retrieval.muvera import FdeConfig, Muvera, chamfer, search_fde

DIM = 32


def unit(rng, n):
    x = rng.standard_normal((n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairs(count, queries=4, documents=8, seed=0):
    """Random unit sets whose documents hold a near copy of each query vector (Chamfer near |Q|)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        q, p = unit(rng, queries), unit(rng, documents)
        p[:queries] = q + 0.3 * unit(rng, queries)
        yield q, p / np.linalg.norm(p, axis=1, keepdims=True)


def normalized_error(muvera, q, p):
    return muvera.query(q) @ muvera.document(p) / muvera.config.r_reps / len(q) - chamfer(q, p) / len(q)


def test_without_projection_the_fde_product_never_exceeds_chamfer():
    muvera = Muvera(FdeConfig(DIM, k_sim=4, r_reps=5, seed=3))
    errors = [normalized_error(muvera, q, p) for q, p in pairs(40)]
    assert max(errors) <= 1e-5  # a bucket's mean (or the filled-in vector) never beats the best match
    single = next(pairs(1))[1][:1]  # one document vector fills every bucket: the product is Chamfer exactly
    q = next(pairs(1, seed=5))[0]
    assert math.isclose(muvera.query(q) @ muvera.document(single) / 5, chamfer(q, single), rel_tol=1e-5)


def test_the_error_shrinks_with_k_sim_within_the_theorem_bound():
    # Theorem 2.1: k_sim = O(log(m / delta) / eps); with the constant 1, eps = log(m / delta) / k_sim
    m, delta = 4 + 8, 0.05
    means = []
    for k_sim in (6, 8, 10, 12):
        muvera = Muvera(FdeConfig(DIM, k_sim=k_sim, r_reps=3, seed=k_sim))
        errors = np.abs([normalized_error(muvera, q, p) for q, p in pairs(60, seed=k_sim)])
        assert np.quantile(errors, 1 - delta) <= math.log(m / delta) / k_sim
        means.append(errors.mean())
    assert means == sorted(means, reverse=True) and means[-1] < 0.1


def test_projections_keep_inner_products_in_expectation():
    plain = Muvera(FdeConfig(DIM, k_sim=3, r_reps=1, seed=7))
    projected = Muvera(FdeConfig(DIM, k_sim=3, d_proj=4096, r_reps=1, seed=7))
    assert projected.config.size == 8 * 4096 and plain.config.size == 8 * DIM
    for q, p in pairs(5):
        exact = plain.query(q) @ plain.document(p)
        assert abs(projected.query(q) @ projected.document(p) - exact) < 0.1 * len(q)


def test_fde_search_with_a_full_shortlist_is_exact_chamfer_ranking():
    rng = np.random.default_rng(11)
    documents = [unit(rng, int(n)) for n in rng.integers(3, 12, size=30)]
    queries = [unit(rng, 4) for _ in range(6)]
    muvera = Muvera(FdeConfig(DIM, k_sim=3, r_reps=4))
    exact = [np.argsort([-chamfer(q, d) for d in documents], kind="stable")[:5] for q in queries]
    np.testing.assert_array_equal(search_fde(muvera, queries, documents, k=5, candidates=30), np.array(exact))
    short = search_fde(muvera, queries, documents, k=5, candidates=10)
    assert short.shape == (6, 5)


def test_bad_input_is_refused():
    muvera = Muvera(FdeConfig(DIM))
    with pytest.raises(UserError, match=r"expected a non-empty \(n, 32\) set"):
        muvera.query(np.zeros((0, DIM)))
    with pytest.raises(UserError, match="r_reps >= 1"):
        Muvera(FdeConfig(DIM, r_reps=0))


def test_token_vectors_are_the_pooled_tokens_hidden_states(tiny_qwen2):
    import torch

    from llm2emb import Embedder

    embedder = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32)
    texts = ["A man is playing a guitar.", "The cat sat.", "Proteins fold into structures in the cell."]
    tokens = embedder.encode_tokens(texts, instruction="Find the passage")
    batch = embedder.tokenize(texts, "Find the passage")
    with torch.no_grad():
        states = embedder.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for row, vectors in enumerate(tokens):
        pooled = states[row][batch["pool_mask"][row].bool()]
        assert vectors.shape == (int(batch["pool_mask"][row].sum()), embedder.dim)  # the instruction is left out
        np.testing.assert_allclose(vectors, torch.nn.functional.normalize(pooled, dim=-1).numpy(), atol=1e-5)
    # unnormalised, the token vectors average to the mean-pooled vector
    raw = embedder.encode_tokens(texts, instruction="Find the passage", normalize=False)
    pooled = embedder.encode(texts, instruction="Find the passage")
    for row, vectors in enumerate(raw):
        mean = vectors.mean(axis=0)
        np.testing.assert_allclose(mean / np.linalg.norm(mean), pooled[row], atol=1e-5)
