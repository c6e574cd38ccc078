"""Exact top-k search by chunked matrix products.

Scores are computed one (query chunk x corpus chunk) block at a time and merged into a running top-k, so memory is
O(query_chunk x (corpus_chunk + k)) whatever the corpus size, and the result is exact (no approximate index).
Ties are broken by corpus position (earlier first), so the ranking does not depend on the chunk sizes.
"""

from __future__ import annotations

import numpy as np

from llm2emb.retrieval.precision import dequantize, quantize


def top_k(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    query_chunk: int = 1024,
    corpus_chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores (dot product) of the k best corpus rows for each query, best first.

    With L2-normalised embeddings the dot product is the cosine similarity. Returns arrays of shape (n_queries,
    min(k, n_corpus)).
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {queries.shape}, corpus {corpus.shape}")
    k = min(k, len(corpus))
    n = len(queries)
    best_idx = np.zeros((n, k), dtype=np.int64)
    best_scores = np.zeros((n, k), dtype=np.float32)
    corpus = np.asarray(corpus, dtype=np.float32)
    for q0 in range(0, n, query_chunk):
        q = np.asarray(queries[q0 : q0 + query_chunk], dtype=np.float32)
        run_scores = np.empty((len(q), 0), dtype=np.float32)
        run_idx = np.empty((len(q), 0), dtype=np.int64)
        for c0 in range(0, len(corpus), corpus_chunk):
            block = q @ corpus[c0 : c0 + corpus_chunk].T
            idx = np.broadcast_to(np.arange(c0, c0 + block.shape[1]), block.shape)
            # The running top-k comes first and holds only earlier positions, so a stable sort on the score
            # alone keeps ties in corpus order.
            scores = np.concatenate([run_scores, block], axis=1)
            idx = np.concatenate([run_idx, idx], axis=1)
            if scores.shape[1] > k:
                # Shrink to the candidates that can still make the top k before the (stable) sort.
                kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]
                keep = scores >= kth[:, None]
                width = int(keep.sum(axis=1).max())
                order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
                scores = np.take_along_axis(scores, order, axis=1)
                idx = np.take_along_axis(idx, order, axis=1)
                scores = np.where(np.take_along_axis(keep, order, axis=1), scores, -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            run_scores = np.take_along_axis(scores, order, axis=1)
            run_idx = np.take_along_axis(idx, order, axis=1)
        best_scores[q0 : q0 + len(q)] = run_scores
        best_idx[q0 : q0 + len(q)] = run_idx
    return best_idx, best_scores


def search_codes(
    queries: np.ndarray,
    corpus_codes: np.ndarray,
    precision: str,
    k: int,
    ranges: np.ndarray | None = None,
    rescore: int | None = None,
    corpus_chunk: int = 16384,
    quantizer=quantize,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows for float `queries` against corpus codes; queries are quantized alike first.

    `rescore` (binary/ubinary): take k x rescore candidates by Hamming, re-rank them by float query . document signs.
    `quantizer(vectors, precision, ranges)` codes the queries (another library's function, to compare codes).
    """
    dim = queries.shape[-1]
    corpus = dequantize(corpus_codes, precision, ranges, dim)
    coded_queries = dequantize(quantizer(queries, precision, ranges), precision, ranges, dim)
    if not rescore or precision not in ("binary", "ubinary"):
        return top_k(coded_queries, corpus, k, corpus_chunk=corpus_chunk)
    candidates, _ = top_k(coded_queries, corpus, k * rescore, corpus_chunk=corpus_chunk)
    scores = np.einsum("qd,qcd->qc", np.asarray(queries, np.float32), corpus[candidates])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(scores, order, axis=1)

