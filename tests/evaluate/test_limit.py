"""LIMIT: every k-subset of the core people is one query's relevant set, and only lexical matches make it so."""

import itertools

import pytest

from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.evaluate.bm25 import bm25_ranking
from llm2emb.evaluate.limit import limit_task
from llm2emb.evaluate.metrics import retrieval_scores


def test_the_qrels_cover_every_k_subset_of_the_core_people():
    task = limit_task("small", core=10, k=3)
    assert len(task.documents) == 10 and len(task.queries) == 120  # C(10, 3)
    relevant_sets = {frozenset(judged) for judged in task.qrels.values()}
    assert relevant_sets == {frozenset(s) for s in itertools.combinations(task.doc_ids, 3)}
    for query, query_id in zip(task.queries, task.query_ids):
        thing = query.removeprefix("Who likes ").removesuffix("?")
        holders = {doc_id for doc_id, text in zip(task.doc_ids, task.documents) if thing in text.split(" likes ")[1]}
        assert holders == set(task.qrels[query_id])  # relevant = exactly the people who like the thing
    assert limit_task("small", core=10, k=3).documents == task.documents  # seeded


def test_the_paper_sizes_and_a_lexical_baseline_that_solves_them():
    small = limit_task("small")
    assert (len(small.documents), len(small.queries)) == (46, 1035)
    assert retrieval_scores(bm25_ranking(small, k=2), small.qrels, ["recall@2"])["recall@2"] == 100.0
    large = limit_task("large")
    assert len(large.documents) == 50_000 and len(set(large.doc_ids)) == 50_000
    core = {doc for judged in large.qrels.values() for doc in judged}
    assert len(core) == 46  # the distractors are never relevant
    with pytest.raises(UserError, match="expected small or large"):
        limit_task("medium")


def test_eval_limit_reports_recall(tiny_qwen2, tmp_path, capsys):
    assert main(["eval", str(tiny_qwen2), "--pooling", "mean", "--limit", "small", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "limit-small/test" in out and "recall@2" in out and "1035q/46d" in out
