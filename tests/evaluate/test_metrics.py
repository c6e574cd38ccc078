"""Metrics against hand-computed cases and against pytrec_eval (trec_eval) on SciFact's real qrels."""

import math

import numpy as np
import pytest

from llm2emb.evaluate.metrics import (
    average_ranks,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    retrieval_scores,
    spearman,
)
from llm2emb.readers import read_qrels

JUDGED = {"d2": 1, "d3": 2, "d9": 1, "d5": 0}
RANKED = ["d1", "d2", "d3", "d5"]


def test_ndcg_by_hand():
    # gains 2^rel - 1 at ranks 2 and 3; the ideal ranking puts d3 (gain 3) first, then d2 and d9 (gain 1).
    dcg = 1 / math.log2(3) + 3 / math.log2(4)
    ideal = 3 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKED, JUDGED, 3) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(RANKED, JUDGED, 1) == 0.0
    # Ideal DCG is cut at k too: at k=2 the ideal is d3, d2.
    assert ndcg_at_k(RANKED, JUDGED, 2) == pytest.approx((1 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert ndcg_at_k(["d3", "d2", "d9"], JUDGED, 10) == pytest.approx(1.0)


def test_recall_and_mrr_by_hand():
    assert recall_at_k(RANKED, JUDGED, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, JUDGED, 100) == pytest.approx(2 / 3)  # d9 never retrieved; d5 (score 0) not relevant
    assert mrr_at_k(RANKED, JUDGED, 1) == 0.0
    assert mrr_at_k(RANKED, JUDGED, 10) == 0.5
    assert mrr_at_k(["d5", "d1", "d9"], JUDGED, 10) == pytest.approx(1 / 3)  # d5 is judged but not relevant


def test_only_queries_with_a_relevant_document_count():
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}, "q3": {"c": 1}}
    ranking = {"q1": ["a"], "q2": ["b"], "q3": ["x", "c"]}
    scores = retrieval_scores(ranking, qrels, ["ndcg@10", "mrr@10", "recall@1"])
    assert scores["mrr@10"] == pytest.approx(100 * (1 + 0.5) / 2)  # q2 left out, not counted as 0
    assert scores["recall@1"] == pytest.approx(50.0)
    # A counted query that retrieved nothing scores 0.
    assert retrieval_scores({"q1": ["a"]}, qrels, ["mrr@10"])["mrr@10"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval_scores(ranking, qrels, ["map@10"])


def _synthetic_run(qrels, doc_ids, rng):
    """Distinct scores over 150 random documents plus, for most queries, some of their judged ones."""
    run = {}
    for q, judged in qrels.items():
        docs = set(rng.choice(doc_ids, size=150, replace=False))
        docs |= {d for d in judged if rng.random() < 0.7}
        docs = sorted(docs)
        # A random boost lifts relevant documents to anywhere from the top to the middle of the list.
        boost = [rng.uniform(0, 200) if d in judged else 0.0 for d in docs]
        scores = rng.permutation(len(docs)) + np.array(boost) + rng.random()
        run[q] = dict(zip(docs, scores))
    return run


@pytest.mark.parametrize("split", ["test", "train"])
def test_metrics_match_pytrec_eval_on_scifact(shared_data, split):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = read_qrels(shared_data / "scifact" / "qrels" / f"{split}.tsv")
    doc_ids = np.array(sorted({line.split('"_id": "')[1].split('"')[0]
                               for line in (shared_data / "scifact" / "corpus.jsonl").open()}))
    run = _synthetic_run(qrels, doc_ids, np.random.default_rng(0))
    ranking = {q: sorted(s, key=s.get, reverse=True) for q, s in run.items()}
    ours = retrieval_scores(ranking, qrels, ["ndcg@10", "recall@100", "mrr@10"])

    int_qrels = {q: {d: int(r) for d, r in j.items()} for q, j in qrels.items()}
    full = pytrec_eval.RelevanceEvaluator(int_qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: {d: run[q][d] for d in ranking[q][:10]} for q in run}
    rr = pytrec_eval.RelevanceEvaluator(int_qrels, {"recip_rank"}).evaluate(top10)
    counted = [q for q, j in qrels.items() if any(r > 0 for r in j.values())]
    assert len(counted) > 250
    assert ours["ndcg@10"] == pytest.approx(100 * np.mean([full[q]["ndcg_cut_10"] for q in counted]), abs=1e-9)
    assert ours["recall@100"] == pytest.approx(100 * np.mean([full[q]["recall_100"] for q in counted]), abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(100 * np.mean([rr[q]["recip_rank"] for q in counted]), abs=1e-9)
    assert 5 < ours["ndcg@10"] < 95  # the synthetic run is neither empty nor perfect, so the check has teeth


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 6, 200).astype(float)  # many ties, like STS-B's scores
    predicted = gold + rng.normal(scale=2.0, size=200)
    assert spearman(predicted, gold) == pytest.approx(100 * stats.spearmanr(predicted, gold).statistic, abs=1e-9)
    assert np.array_equal(average_ranks(gold), stats.rankdata(gold))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-100.0)
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0])
