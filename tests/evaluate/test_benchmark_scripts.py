"""The benchmark scripts' own input checks: what they refuse, and the rows they build."""

import argparse
import json

import pytest
import torch
import yaml

from scripts import compare_recipes
from scripts.bench_train import beir_triplets
from tests.conftest import save_tiny_model


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
            {"system": "st", "seed": 3, "stsb": 74.0, "scifact": 30.0},
            {"system": "default", "seed": 1, "stsb": 75.0, "scifact": 38.0},
            {"system": "default", "seed": 2, "stsb": 73.0, "scifact": 40.0},
            {"system": "lr9", "seed": 1, "stsb": 80.0, "scifact": 41.0},
            {"system": "lr9", "seed": 2, "stsb": 12.0, "scifact": 3.0, "collapsed": True, "collapse": "step 30: ..."}]
    report = tmp_path / "rows.jsonl"
    report.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    compare_recipes.main(["--report", str(report), "--systems", "st", "default", "lr9", "--table",
                          str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| `st` | 3 | 0 | 70.00 / 72.00 / 74.00 (4.00) | 20.00 / 22.00 / 30.00 (10.00) | - |" in table
    assert "| `default` | 2 | 0 | 73.00 / 74.00 / 75.00 (2.00) | 38.00 / 39.00 / 40.00 (2.00) | - |" in table
    assert "| `lr9` | 2 | 1 | 12.00 / 46.00 / 80.00 (68.00) | 3.00 / 22.00 / 41.00 (38.00) | - |" in table
    assert "| `default` vs `st` | +1.00 | +16.00 |" in table  # worst llm2emb run minus the median baseline run
    assert "| `lr9` vs `st` | collapsed | collapsed |" in table
    tuned = [{"system": "st-lr2", "seed": s, "stsb": 74.5, "scifact": 25.0} for s in (1, 2)]
    report.write_text("".join(json.dumps(r) + "\n" for r in rows + tuned))
    compare_recipes.main(["--report", str(report), "--systems", "st", "st-lr2", "default", "--baselines", "st-lr2",
                          "--table", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()  # the gap table against the named baseline only
    assert "| `default` vs `st-lr2` | -1.50 | +13.00 |" in table and "`default` vs `st` |" not in table
    # rows from several files; runs scored on other tasks (no stsb-dev) count neither as failed nor at all there
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({**r, "seed": r["seed"] + 10, "stsb-dev": 80.0 + r["seed"]}) + "\n"
                           for r in rows if r["system"] in ("st", "default")))
    compare_recipes.main(["--report", str(report), str(dev), "--systems", "st", "default", "--table",
                          str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| `default` | 4 | 0 |" in table
    assert "| `default` vs `st` | +1.00 | -1.00 | +16.00 |" in table
    with pytest.raises(SystemExit):
        compare_recipes.parse_args(["--steps", "10"])
    assert "--base, --causal-base and --out are required unless --report or --collect is given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_recipes.parse_args(["--report", "r.jsonl", "--seeds", "1", "2", "--row-seeds", "5"])
    assert "--row-seeds needs one row order per seed: 2 seeds, 1 row seeds" in capsys.readouterr().err


def test_compare_recipes_row_orders_are_seeded_permutations_of_the_whole_file(tmp_path):
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}) + "\n"
                            for i in range(50)))
    args = compare_recipes.parse_args(["--report", "x", "--data", str(data), "--steps", "2", "--batch-size", "4",
                                       "--seeds", "1", "2", "--row-seeds", "7", "8"])
    assert compare_recipes.runs(args) == [(1, 7), (2, 8)]
    first = compare_recipes.write_rows(args, tmp_path / "out")
    assert [json.loads(line)["query"] for line in first.read_text().splitlines()] == [f"q{i}" for i in range(8)]
    seven = compare_recipes.write_rows(args, tmp_path / "out", 7).read_text().splitlines()
    eight = compare_recipes.write_rows(args, tmp_path / "out", 8).read_text().splitlines()
    assert len(seven) == len(eight) == 8 and seven != eight
    assert len(set(seven)) == 8 and set(seven) <= set(data.read_text().splitlines())
    assert seven != first.read_text().splitlines()
    again = compare_recipes.write_rows(args, tmp_path / "again", 7).read_text().splitlines()
    assert again == seven  # a rerun draws the same rows
    assert compare_recipes.run_name("default", 1, 7) == "default-s1-r7" and compare_recipes.run_name("st", 2, None) == "st-s2"


def test_compare_recipes_st_overrides_read_numbers_as_numbers():
    assert compare_recipes.st_overrides("st-x:learning_rate=1e-4,warmup_ratio=0.1,lr_scheduler_type=cosine,seed=3") == {
        "learning_rate": 1e-4, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "seed": 3}
    assert compare_recipes.is_st("st-x") and compare_recipes.is_st("st") and not compare_recipes.is_st("stable")


def test_compare_recipes_st_lora_trains_an_adapter_and_saves_it_merged(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base = save_tiny_model(tmp_path / "base")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": f"q {i} text", "positive": f"p {i} words", "negative": f"n {i}"})
                            + "\n" for i in range(16)))
    args = argparse.Namespace(causal_base=str(base), max_length=16, steps=3, batch_size=4, rows=None)
    model_dir = compare_recipes.train_st(args, "st-lora:lora_r=4,lora_alpha=8,learning_rate=1e-2", 1, rows,
                                         tmp_path / "run")
    assert not list(model_dir.glob("adapter_*"))  # a plain sentence-transformers folder, every weight in it
    before = AutoModel.from_pretrained(str(base)).state_dict()
    after = SentenceTransformer(str(model_dir), device="cpu")[0].auto_model.state_dict()
    assert list(before) == list(after)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed and all("proj" in name for name in changed)  # the adapted linears moved, nothing else did


def test_budget_plot_spreads_count_each_run_once_per_budget(tmp_path):
    from scripts.budget_plot import plot, spreads

    run = {"system": "sink", "steps": 20, "batch_size": 16}
    rows = [{**run, "seed": 1, "row_seed": 101, "stsb-dev": 70.0}, {**run, "seed": 2, "row_seed": 102, "stsb-dev": 74.0},
            {**run, "seed": 3, "row_seed": 103, "stsb-dev": 80.0},
            {**run, "seed": 3, "row_seed": 103, "stsb-dev": 80.0},  # the same run in a second file
            {**run, "steps": 51, "batch_size": 32, "seed": 1, "row_seed": 201, "stsb": 73.0},
            {"system": "st", "steps": 20, "batch_size": 16, "seed": 1, "row_seed": 101, "stsb-dev": 65.0}]
    found = spreads(rows, ["st", "sink"])
    assert found["stsb-dev"]["sink"] == {"20 x 16": (70.0, 74.0, 80.0)}
    assert found["stsb-dev"]["st"] == {"20 x 16": (65.0, 65.0, 65.0)} and found["stsb"]["sink"] == {"51 x 32": (73.0,) * 3}
    plot(found, ["st", "sink"], str(tmp_path / "budgets.png"))
    assert (tmp_path / "budgets.png").stat().st_size > 0


def test_st_recipe_trains_every_stage_on_llm2emb_batches_with_the_library_losses(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from llm2emb.train.recipe_file import load_recipe
    from scripts import st_recipe

    base = save_tiny_model(tmp_path / "base")
    (tmp_path / "triplets.jsonl").write_text("".join(
        json.dumps({"query": f"premise {i}", "positive": f"entailed {i}", "negative": f"contradiction {i}"}) + "\n"
        for i in range(12)))
    (tmp_path / "pairs.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{i % 6}.0\tfirst {i}\tsecond {i}\n" for i in range(16)))
    (tmp_path / "claims.jsonl").write_text("".join(
        json.dumps({"query": f"claim {i}", "positive": f"abstract {i}"}) + "\n" for i in range(8)))
    recipe = {
        "model": {"base": str(base), "max_length": 16}, "output_dir": str(tmp_path / "unused"), "seed": 3,
        "stages": [
            {"name": "general", "max_steps": 3, "batch_size": 4, "hard_negatives": 1,
             "datasets": [{"path": "triplets.jsonl"}, {"path": "pairs.tsv", "format": "scored_pairs"}]},
            {"name": "similarity", "max_steps": 2, "hard_negatives": 0, "loss": "cosent",
             "datasets": [{"path": "pairs.tsv", "format": "scored_pairs"}]},
            {"name": "retrieval", "max_steps": 2, "loss": "infonce",
             "datasets": [{"path": "claims.jsonl", "instruction": "Find the abstract"}]},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)

    general, prefix = st_recipe.stage_rows(loaded.stages[0], 0, loaded)
    assert prefix is None and len(general["anchor"]) == len(general["negative_1"]) == 12
    for start in range(0, 12, 4):  # llm2emb's batches: each from one dataset, pairs with random negatives
        batch = general["anchor"][start:start + 4]
        assert len({text.split()[0] for text in batch}) == 1
        if batch[0].startswith("first"):
            assert all(n.startswith("second") and n != p for n, p in
                       zip(general["negative_1"][start:start + 4], general["positive"][start:start + 4]))
    graded, _ = st_recipe.stage_rows(loaded.stages[1], 1, loaded)
    assert set(graded) == {"anchor", "positive", "score"} and {float(i % 6) for i in range(16)} >= set(graded["score"])
    retrieval, prefix = st_recipe.stage_rows(loaded.stages[2], 2, loaded)
    assert prefix == "Instruct: Find the abstract\nQuery: "
    assert all(text.startswith(prefix + "claim ") for text in retrieval["anchor"]) and set(retrieval) == {"anchor", "positive"}

    out = tmp_path / "st"
    st_recipe.main([str(path), "--base", str(base), "--out", str(out), "--learning-rates", "1e-2", "1e-2", "1e-2",
                    "--set", "warmup_ratio=0.1"])
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert model.prompts.get("query") == prefix  # llm2emb eval's encode_query prompts queries as training did
    stages = [json.loads((out / "stages" / name / "stage.json").read_text())
              for name in ("0-general", "1-similarity", "2-retrieval")]
    assert [s["loss"] for s in stages] == ["infonce", "cosent", "infonce"]
    assert stages[0]["settings"] == {"learning_rate": 1e-2, "warmup_ratio": 0.1}
    before = AutoModel.from_pretrained(str(base)).state_dict()
    after = model[0].auto_model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)

    with pytest.raises(SystemExit, match=r"--learning-rates: 2 given for 3 stages"):
        st_recipe.main([str(path), "--base", str(base), "--out", str(tmp_path / "short"), "--learning-rates", "1", "2"])
    recipe["stages"][0]["datasets"][0]["in_batch_negatives"] = False  # MNRL cannot drop them: refused
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match=r"stages\[0\] \(general\): MultipleNegativesRankingLoss always uses in-batch"):
        st_recipe.main([str(path), "--base", str(base), "--out", str(tmp_path / "no-in-batch")])
    recipe["stages"][0]["datasets"][0]["in_batch_negatives"] = True
    recipe["stages"][2]["matryoshka_dims"] = [8]  # refused, not trained without it
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match=r"stages\[2\] \(retrieval\): matryoshka_dims has no sentence-transformers"):
        st_recipe.main([str(path), "--base", str(base), "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "short").exists() and not (tmp_path / "no-in-batch").exists()


def test_compare_recipes_report_keeps_only_the_runs_asked_for(tmp_path):
    rows = [{"system": name, "seed": seed, "row_seed": 100 + seed, "stsb-dev": score}
            for name, seed, score in [("st", 1, 70.0), ("st", 2, 72.0), ("st", 3, 60.0), ("new", 1, 75.0),
                                      ("new", 2, 71.0)]]
    report = tmp_path / "rows.jsonl"
    report.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compare_recipes.main(["--report", str(report), "--systems", "st", "new", "--seeds", "1", "2", "--row-seeds",
                          "101", "102", "--table", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| `st` | 2 | 0 | 70.00 / 71.00 / 72.00 (2.00) |" in table  # order 103's run left out
    assert "| `new` vs `st` | +0.00 |" in table
