"""Chunked exact top-k equals a full sort, whatever the chunk sizes, ties included."""

import numpy as np
import pytest

from llm2emb.evaluate.search import top_k


def _full(queries, corpus, k):
    scores = queries.astype(np.float32) @ corpus.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("query_chunk,corpus_chunk", [(1, 1), (3, 7), (64, 50), (1000, 100000)])
@pytest.mark.parametrize("k", [1, 10, 120])
def test_chunked_equals_full_argsort(query_chunk, corpus_chunk, k):
    rng = np.random.default_rng(k)
    # Small integers make every dot product exact, whatever blocking the matrix product picks for a chunk's
    # shape; with floats a duplicate document could score one ulp apart in two chunks and break the tie.
    corpus = rng.integers(-3, 4, size=(300, 16)).astype(np.float32)
    corpus[150:170] = corpus[10]  # duplicate documents give exactly tied scores across chunks
    queries = rng.integers(-3, 4, size=(23, 16)).astype(np.float32)
    idx, scores = top_k(queries, corpus, k, query_chunk=query_chunk, corpus_chunk=corpus_chunk)
    want_idx, want_scores = _full(queries, corpus, k)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    # Ties resolve to the earlier corpus position, like a stable full sort.
    assert np.array_equal(idx, want_idx)


def test_k_larger_than_corpus_and_shape_errors():
    corpus = np.eye(4, dtype=np.float32)
    idx, scores = top_k(np.eye(4, dtype=np.float32)[:2], corpus, 10, corpus_chunk=3)
    assert idx.shape == (2, 4) and idx[0, 0] == 0 and idx[1, 0] == 1
    assert np.array_equal(idx[0], [0, 1, 2, 3])  # the zero scores keep corpus order
    with pytest.raises(ValueError, match="shapes"):
        top_k(np.ones((2, 3)), corpus, 1)
