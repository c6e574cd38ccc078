"""`llm2emb mine`: the margin rule by hand, and mining on a tiny BEIR folder checked against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm2emb.cli import main
from llm2emb.commands.mine import mine, parse_window, select_negatives
from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.data import load_rows
from llm2emb.train.recipe import DatasetSpec

DOCS = {
    "d0": ("Guitar", "A man is playing a guitar on the street."),
    "d1": ("", "A woman is slicing an onion in the kitchen."),
    "d2": ("Cats", "The cat sat on the mat and looked at the dog."),
    "d3": ("", "Paris is the capital of France."),
    "d4": ("Enzymes", "Proteins fold; enzymes catalyse reactions."),
    "d5": ("", "The dog looked at the cat."),
    "d6": ("", "A chef cuts vegetables."),
    "d7": ("Music", "Someone plays an instrument outside."),
}
QUERIES = {"q0": "who plays guitar?", "q1": "what is the capital of France?", "q2": "what do enzymes do?"}
QRELS = [("q0", "d0", 1), ("q0", "d7", 1), ("q1", "d3", 2), ("q2", "d4", 1), ("q2", "d1", 0)]


def test_select_negatives_by_hand():
    ranked = [5, 1, 7, 3, 9, 2]
    scores = [0.99, 0.95, 0.9, 0.8, 0.5, 0.1]
    # Without the positive 1: 5, 7, 3, 9, 2. Window 1:5 skips 5. Margin 0.95 x 0.9 = 0.855 drops 7 (0.9).
    assert select_negatives(ranked, scores, {1}, 0.9, (1, 5), 0.95, 2) == ([3, 9], 1)
    assert select_negatives(ranked, scores, {1}, 0.9, (1, 5), None, 2) == ([7, 3], 0)
    assert select_negatives(ranked, scores, {1}, 0.9, (0, 2), 0.95, 5) == ([], 2)
    assert select_negatives(ranked, scores, set(), 0.5, (0, 6), 1.0, 9) == ([2], 5)


def test_parse_window():
    assert parse_window("10:100") == (10, 100) and parse_window(":5") == (0, 5)
    for bad in ("10", "5:5", "a:b", "-1:4"):
        with pytest.raises(UserError, match="--rank-window"):
            parse_window(bad)


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, (t, x) in DOCS.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": t}) + "\n" for k, t in QUERIES.items()))
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    return root


def doc_text(key: str) -> str:
    title, text = DOCS[key]
    return f"{title} {text}" if title else text


@pytest.fixture(scope="module")
def model(tiny_qwen2) -> Embedder:
    return Embedder.from_pretrained(tiny_qwen2, pooling="mean")


def expected_negatives(model, query, positive, positives, window, margin, count, instruction=None):
    """Brute force: score every document, sort, drop positives, window, margin."""
    keys = list(DOCS)
    docs = model.encode_documents([doc_text(k) for k in keys])
    q = model.encode([query], instruction=instruction)[0]
    p = model.encode_documents([positive])[0]
    scores = docs @ q
    order = [keys[i] for i in np.argsort(-scores, kind="stable") if keys[i] not in positives]
    kept = [k for k in order[window[0]:window[1]] if margin is None or scores[keys.index(k)] < margin * (q @ p)]
    return [doc_text(k) for k in kept[:count]]


@pytest.mark.parametrize("margin", [None, 0.9])
def test_mine_beir_matches_brute_force_and_loads_as_training_data(model, beir, tmp_path, margin):
    out = tmp_path / "negatives.jsonl"
    stats = mine(model, beir / "corpus.jsonl", out, queries=beir / "queries.jsonl",
                 qrels=beir / "qrels" / "train.tsv", top_k=6, rank_window=(1, 6), margin=margin, num_negatives=3,
                 instruction="Find the passage")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["query"], r["positive"]) for r in rows] == [
        (QUERIES["q0"], doc_text("d0")), (QUERIES["q0"], doc_text("d7")),
        (QUERIES["q1"], doc_text("d3")), (QUERIES["q2"], doc_text("d4")),
    ]  # relevance 0 (q2, d1) is not a positive
    positives = {"q0": {"d0", "d7"}, "q1": {"d3"}, "q2": {"d4"}}
    for row, (query_id, _, _) in zip(rows, [r for r in QRELS if r[2] > 0]):
        want = expected_negatives(model, row["query"], row["positive"], positives[query_id], (1, 6), margin, 3,
                                  instruction="Find the passage")
        assert row["negatives"] == want
        assert row["instruction"] == "Find the passage"
        assert not {doc_text(d) for d in positives[query_id]} & set(row["negatives"])
    assert stats.rows == 4 and stats.queries == 3
    assert (stats.masked_by_margin > 0) == (margin is not None)

    spec = DatasetSpec.model_validate({"path": str(out)}, context={"base_dir": tmp_path})
    loaded = load_rows(spec).rows
    assert loaded["negatives"] == [r["negatives"] for r in rows]
    assert loaded["instruction"] == ["Find the passage"] * 4


def test_mine_from_pairs_through_the_cli(model, beir, tiny_qwen2, tmp_path, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": QUERIES["q1"], "positive": doc_text("d3"), "instruction": "Answer"}) + "\n")
    out = tmp_path / "mined.jsonl"
    code = main(["mine", str(folder), "--corpus", str(beir / "corpus.jsonl"), "--pairs", str(pairs),
                 "--out", str(out), "--top-k", "5", "--margin", "none", "--num-negatives", "2"])
    assert code == 0 and "1 rows for 1 queries" in capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["negatives"] == expected_negatives(model, QUERIES["q1"], doc_text("d3"), {"d3"}, (0, 5), None, 2,
                                                  instruction="Answer")
    assert row["instruction"] == "Answer"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--qrels", "QRELS"], "--qrels needs --queries"),
        (["--queries", "Q", "--qrels", "QRELS", "--rank-window", "5:200"], "beyond --top-k 100"),
        (["--queries", "Q", "--qrels", "QRELS", "--rank-window", "9"], "--rank-window 9: expected START:END"),
        (["--queries", "Q", "--qrels", "QRELS", "--num-negatives", "0"], "--num-negatives must be at least 1"),
        (["--pairs", "missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_mine_cli_errors_are_one_line(beir, tmp_path, capsys, extra, message):
    extra = [{"QRELS": str(beir / "qrels" / "train.tsv"), "Q": str(beir / "queries.jsonl")}.get(a, a) for a in extra]
    code = main(["mine", "unused-model", "--corpus", str(beir / "corpus.jsonl"), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def recipe_with_mining(base: Path, beir: Path, out: Path, **mine_keys) -> dict:
    return {
        "model": {"base": str(base), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "output_dir": str(out), "report_to": [], "save_steps": 1,
        "stages": [{
            "name": "mined", "max_steps": 2, "batch_size": 2, "hard_negatives": 2, "datasets": [],
            "mine": {"corpus": str(beir / "corpus.jsonl"), "queries": str(beir / "queries.jsonl"),
                     "qrels": str(beir / "qrels" / "train.tsv"), "top_k": 5, "num_negatives": 2, **mine_keys},
        }],
    }


def test_a_stage_mines_with_its_starting_weights_and_a_resume_reuses_the_file(tiny_qwen2, beir, tmp_path):
    from llm2emb.train.objectives import build_objective_data
    from llm2emb.train.recipe_file import validate_recipe
    from llm2emb.train.remine import MINED_NAME, with_mined_negatives
    from llm2emb.train.runner import run_recipe

    recipe = validate_recipe(recipe_with_mining(tiny_qwen2, beir, tmp_path / "run", margin=None))
    summary = run_recipe(recipe)
    mined = tmp_path / "run" / "stages" / "0-mined" / MINED_NAME
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    assert len(rows) == 4 and summary.stages[0]["steps"] == 2
    assert all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] for r in rows)

    # Resuming: the file of the interrupted run is read back, not mined again with moved weights.
    rows[0]["negatives"] = ["a negative only the first run wrote", "and another"]
    mined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = recipe.stages[0]
    data = with_mined_negatives(stage, 0, build_objective_data(stage, 0, "fail", 0), None, mined.parent, "fail", 0)
    assert data.parts[-1].rows[0]["negatives"] == rows[0]["negatives"] and len(data.parts) == 1


def test_a_stage_mines_for_its_training_pairs(tiny_qwen2, beir, tmp_path):
    from llm2emb.train.recipe_file import validate_recipe
    from llm2emb.train.remine import MINED_NAME
    from llm2emb.train.runner import run_recipe

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,positive,instruction\n"
                     + "".join(f"{QUERIES[q]},{doc_text(d)},Answer\n" for q, d in (("q0", "d0"), ("q1", "d3"))))
    data = recipe_with_mining(tiny_qwen2, beir, tmp_path / "run", margin=None, queries=None, qrels=None,
                              pairs=str(pairs))
    run_recipe(validate_recipe(data))
    rows = [json.loads(line) for line in (tmp_path / "run" / "stages" / "0-mined" / MINED_NAME).read_text().splitlines()]
    assert [(r["query"], r["instruction"]) for r in rows] == [(QUERIES["q0"], "Answer"), (QUERIES["q1"], "Answer")]
    assert all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] for r in rows)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"qrels": None}, r"stages\[0\]\.mine\.qrels: give exactly one of qrels"),
        ({"rank_window": [4, 9]}, r"stages\[0\]\.mine\.rank_window: \[4, 9\] must satisfy start < end <= top_k \(5\)"),
        ({"corpus": "missing.jsonl"}, r"stages\[0\]\.mine\.corpus: missing.jsonl: file not found"),
    ],
)
def test_mine_stage_keys_are_validated(tiny_qwen2, beir, tmp_path, keys, message):
    from llm2emb.train.recipe_file import validate_recipe

    data = recipe_with_mining(tiny_qwen2, beir, tmp_path / "run")
    data["stages"][0]["mine"].update(keys)
    with pytest.raises(UserError, match=message):
        validate_recipe(data, base_dir=tmp_path)
    data = recipe_with_mining(tiny_qwen2, beir, tmp_path / "run")
    data["stages"][0]["hard_negatives"] = 0
    with pytest.raises(UserError, match=r"stages\[0\]\.mine: mined negatives need .* hard_negatives >= 1"):
        validate_recipe(data)
