"""Data through `datasets` as a user's recipe names it: `save_to_disk` folders, a local copy of a hub repository
with its README configurations (the layout `load_dataset` reads from the hub itself), STS tables and retrieval
tasks in MTEB's hub layout, and one line for each way they go wrong."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from llm2emb.errors import UserError
from llm2emb.evaluate.data import load_beir, load_mteb, load_sts_table
from llm2emb.hf_tables import load_table

CORPUS = [{"_id": "d1", "title": "Title", "text": "body one"}, {"_id": "d2", "title": "", "text": "body two"},
          {"_id": "d3", "title": "Other", "text": "body three"}]
QUERIES = [{"_id": "1", "text": "first"}, {"_id": "2", "text": "second"}]
QRELS = {"train": [{"query-id": "1", "corpus-id": "d1", "score": 1}],
         "test": [{"query-id": "2", "corpus-id": "d2", "score": 2}, {"query-id": "2", "corpus-id": "d3", "score": 0}]}
README = """---
configs:
- config_name: corpus
  data_files:
  - split: corpus
    path: corpus.jsonl
- config_name: queries
  data_files:
  - split: queries
    path: queries.jsonl
- config_name: default
  data_files:
  - split: train
    path: qrels/train.jsonl
  - split: test
    path: qrels/test.jsonl
---
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """`load_dataset` caches what it builds; each test builds into its own folder, never the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def hub_copy(folder: Path, corpus=CORPUS) -> Path:
    """A retrieval task laid out as mteb/scifact is on the hub: three configurations declared in README.md."""
    (folder / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(README)
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", QUERIES)
    for split, rows in QRELS.items():
        write_jsonl(folder / "qrels" / f"{split}.jsonl", rows)
    return folder


def saved_copy(folder: Path) -> Path:
    """The same task as `save_to_disk` folders, one per configuration, as a user who saved each one would have it."""
    datasets.DatasetDict({"corpus": datasets.Dataset.from_list(CORPUS)}).save_to_disk(str(folder / "corpus"))
    datasets.Dataset.from_list(QUERIES).save_to_disk(str(folder / "queries"))
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in QRELS.items()}).save_to_disk(
        str(folder / "default"))
    return folder


def test_a_saved_dataset_dict_gives_the_split_asked_for(tmp_path):
    folder = tmp_path / "pairs"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": ["q1", "q2"]}),
                          "test": datasets.Dataset.from_dict({"query": ["t1"]})}).save_to_disk(str(folder))
    assert load_table(str(folder), split="train")["query"] == ["q1", "q2"]
    assert load_table(str(folder), split="test")["query"] == ["t1"]
    with pytest.raises(UserError, match=rf"^{folder}: no split 'dev'; it has train, test$"):
        load_table(str(folder), split="dev")
    with pytest.raises(UserError, match=rf"^{folder}: has splits train, test; name one \(split:\)$"):
        load_table(str(folder))


def test_a_saved_dataset_is_its_own_table(tmp_path):
    folder = tmp_path / "one"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(folder))
    assert load_table(str(folder), split="train")["text"] == ["a", "b", "c"]


def test_what_datasets_cannot_load_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as error:
        load_table(str(empty), split="train")
    assert str(error.value).startswith(f"{empty}: datasets could not load it: ")
    assert "\n" not in str(error.value)


def test_a_hub_layout_task_equals_the_same_beir_folder(tmp_path):
    beir = tmp_path / "beir"
    write_jsonl(beir / "corpus.jsonl", CORPUS)
    write_jsonl(beir / "queries.jsonl", QUERIES)
    (beir / "qrels").mkdir()
    for split, rows in QRELS.items():
        (beir / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in rows))
    for copy in (hub_copy(tmp_path / "hub"), saved_copy(tmp_path / "saved")):
        for split in ("train", "test"):
            ours, reference = load_mteb(str(copy), split), load_beir(beir, split)
            assert (ours.doc_ids, ours.documents, ours.query_ids, ours.queries, ours.qrels) == (
                reference.doc_ids, reference.documents, reference.query_ids, reference.queries, reference.qrels)
            assert ours.corpus_hash == reference.corpus_hash
    assert load_mteb(str(tmp_path / "hub"), "test").documents == ["Title body one", "body two", "Other body three"]


def test_a_hub_layout_task_refuses_what_a_beir_folder_refuses(tmp_path):
    hub = hub_copy(tmp_path / "short", corpus=CORPUS[:1])  # d2, relevant in test, is missing
    with pytest.raises(UserError, match=r"\(corpus\): 1 document id\(s\) judged relevant in .* are absent, e\.g\. 'd2'"):
        load_mteb(str(hub), "test")
    assert load_mteb(str(hub), "test", evaluated=False).qrels == {"2": {"d2": 2.0, "d3": 0.0}}  # training: row by row
    with pytest.raises(UserError, match=r"\(default\): no split 'dev'; it has train, test"):
        load_mteb(str(hub), "dev")
    bare = tmp_path / "bare"
    datasets.Dataset.from_dict({"id": ["d1"], "body": ["x"]}).save_to_disk(str(bare / "corpus"))
    with pytest.raises(UserError, match=r"\(corpus; MTEB's hub layout.*\): missing column\(s\) _id, text; it has id, body"):
        load_mteb(str(bare), "test")


def test_sts_from_a_table(tmp_path):
    folder = tmp_path / "stsb"
    rows = {"sentence1": ["a cat", "a dog", "rain"], "sentence2": ["a cat sits", "a car", "sun"], "score": [1.0, 0.2, 0.0]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    data = load_sts_table(str(folder), split="test")
    assert (data.sentences1, data.sentences2, data.scores) == (rows["sentence1"], rows["sentence2"], rows["score"])
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({**rows, "score": ["high", "low", "none"]})}).save_to_disk(
        str(tmp_path / "words"))
    with pytest.raises(UserError, match=r"\(test\): row 1: expected two strings and a numeric score"):
        load_sts_table(str(tmp_path / "words"), split="test")


def test_a_recipe_evaluates_on_tables_and_hub_layout_tasks(tmp_path):
    from llm2emb.train.callbacks import Evaluator
    from llm2emb.train.recipe_file import validate_recipe

    (tmp_path / "pairs.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [0.9, 0.1]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "stsb"))
    saved_copy(tmp_path / "task")
    recipe = validate_recipe({
        "model": {"base": "Qwen/Qwen2.5-0.5B"}, "output_dir": str(tmp_path / "run"),
        "stages": [{"name": "s", "max_steps": 1, "batch_size": 2, "datasets": [{"path": "pairs.jsonl"}]}],
        "eval": {"sts": [{"path": "stsb", "format": "hf"}],
                 "beir": [{"path": "task", "format": "mteb", "split": "test", "corpus_sample": 2}]},
    }, base_dir=tmp_path)
    evaluator = Evaluator.from_spec(recipe.eval)
    assert evaluator.sts[0].scores == [0.9, 0.1]
    task, instruction = evaluator.beir[0]
    assert (task.query_ids, len(task.doc_ids), instruction) == (["2"], 2, None)
