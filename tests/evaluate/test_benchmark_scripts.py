"""The benchmark scripts' own input checks: what they refuse, and the rows they build."""

import json

import pytest

from scripts import compare_recipes
from scripts.bench_train import beir_triplets


def test_bench_train_beir_triplets_keep_every_text_unique_in_a_batch(tmp_path, write_beir):
    corpus = [(f"d{i}", "", f"abstract {i}") for i in range(8)]
    queries = [("q1", "claim one"), ("q2", "claim two"), ("q3", "claim one"), ("q4", "claim four")]
    qrels = [("q1", "d0", 1), ("q2", "d0", 1), ("q2", "d1", 1), ("q3", "d2", 1), ("q4", "d3", 1)]
    folder = write_beir(tmp_path / "beir", corpus, queries, qrels, split="train")
    rows = beir_triplets(folder, 6, batch_size=3)
    # q3 repeats q1's text and is skipped; q2 takes d1 since q1 holds d0: three pairs, cycled
    assert [r["query"] for r in rows] == ["claim one", "claim two", "claim four"] * 2
    assert [r["positive"] for r in rows[:3]] == ["abstract 0", "abstract 1", "abstract 3"]
    for batch in (rows[:3], rows[3:]):
        texts = [r["positive"] for r in batch] + [r["negative"] for r in batch]
        assert len(set(texts)) == len(texts)
    with pytest.raises(SystemExit, match="--batch-size 4 exceeds its 3 distinct train pairs"):
        beir_triplets(folder, 8, batch_size=4)


def test_compare_recipes_report_builds_the_table_from_rows_and_needs_the_bases_otherwise(tmp_path, capsys):
    rows = [{"system": "st", "seed": 1, "stsb": 70.0, "scifact": 20.0},
            {"system": "st", "seed": 2, "stsb": 72.0, "scifact": 22.0},
            {"system": "default", "seed": 1, "stsb": 75.0, "scifact": 38.0}]
    report = tmp_path / "rows.jsonl"
    report.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    compare_recipes.main(["--report", str(report), "--systems", "st", "default", "--table", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| `st` | 2 | 71.00 (70.00-72.00) | 21.00 (20.00-22.00) | - |" in table
    assert "| `default` | 1 | 75.00 (75.00-75.00) | 38.00 (38.00-38.00) | - |" in table
    with pytest.raises(SystemExit):
        compare_recipes.parse_args(["--steps", "10"])
    assert "--base, --causal-base and --out are required unless --report is given" in capsys.readouterr().err
