"""Retrieval and STS metrics as the field computes them (BEIR / MTEB conventions), in plain numpy.

Relevance: a qrel with score > 0 is relevant; nDCG uses graded gains 2^rel - 1 with log2(rank + 1) discounts and an
ideal DCG over all relevant documents of the query (not only the retrieved ones). Queries without a relevant
document are left out of every average, so adding unjudged queries never changes a score. For binary qrels
(SciFact, most of BEIR) this equals pytrec_eval's `ndcg_cut` exactly; pytrec_eval uses linear gains on graded qrels.
All aggregate scores are x100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, float]]
"""query id -> {document id -> relevance score}"""
Ranking = Mapping[str, Sequence[str]]
"""query id -> document ids, best first"""


def relevant(judged: Mapping[str, float]) -> dict[str, float]:
    """The documents that count as relevant: score > 0."""
    return {doc: rel for doc, rel in judged.items() if rel > 0}


def dcg(gains: Sequence[float]) -> float:
    gains = np.asarray(gains, dtype=np.float64)
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, float], k: int) -> float:
    """nDCG@k in [0, 1] of one query; 0 when nothing is relevant."""
    rel = relevant(judged)
    if not rel:
        return 0.0
    gains = [2.0 ** rel.get(doc, 0.0) - 1.0 for doc in ranked[:k]]
    ideal = sorted((2.0**r - 1.0 for r in rel.values()), reverse=True)[:k]
    return dcg(gains) / dcg(ideal)


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, float], k: int) -> float:
    """Fraction of the relevant documents found in the top k."""
    rel = relevant(judged)
    if not rel:
        return 0.0
    return sum(doc in rel for doc in ranked[:k]) / len(rel)


def mrr_at_k(ranked: Sequence[str], judged: Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top k, else 0."""
    rel = relevant(judged)
    for rank, doc in enumerate(ranked[:k], start=1):
        if doc in rel:
            return 1.0 / rank
    return 0.0


_METRICS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}
DEFAULT_RETRIEVAL_METRICS = ("ndcg@10", "recall@100", "mrr@10")


def evaluated_queries(qrels: Qrels) -> list[str]:
    """The queries that count: those with at least one relevant document."""
    return sorted(q for q, judged in qrels.items() if relevant(judged))


def retrieval_scores(
    ranking: Ranking, qrels: Qrels, metrics: Sequence[str] = DEFAULT_RETRIEVAL_METRICS
) -> dict[str, float]:
    """Mean of each metric (`name@k`, name in ndcg / recall / mrr) over the evaluated queries, x100.

    A query that counts but is missing from `ranking` scores 0 (it retrieved nothing).
    """
    queries = evaluated_queries(qrels)
    if not queries:
        raise ValueError("no query has a relevant document (qrel score > 0)")
    out = {}
    for metric in metrics:
        name, _, k = metric.partition("@")
        if name not in _METRICS or not k.isdigit() or int(k) < 1:
            raise ValueError(f"unknown metric {metric!r}; use ndcg@K, recall@K or mrr@K")
        fn = _METRICS[name]
        out[metric] = 100.0 * float(np.mean([fn(ranking.get(q, ()), qrels[q], int(k)) for q in queries]))
    return out


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank (scipy's `rankdata(method="average")`)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(predicted: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation x100 (ties get average ranks), as MTEB reports STS."""
    predicted, gold = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if predicted.shape != gold.shape or predicted.ndim != 1 or len(predicted) < 2:
        raise ValueError(f"need two equal-length score vectors of length >= 2, got {predicted.shape} and {gold.shape}")
    a, b = average_ranks(predicted), average_ranks(gold)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return 100.0 * float((a * b).sum() / denom) if denom > 0 else float("nan")
