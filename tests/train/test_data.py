"""Training data: every input format, bad rows (fail with file:line, or skip and count), the batch sampler
(one dataset per batch, weights, determinism) and the collator's batch layout (docs/CONTRACTS.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.data import (
    ContrastiveCollator,
    MixedBatchSampler,
    StageData,
    load_rows,
    text_id,
    training_order,
)
from llm2emb.train.recipe import DatasetSpec


def spec(path: Path, **kwargs) -> DatasetSpec:
    return DatasetSpec.model_validate({"path": str(path), **kwargs}, context={"base_dir": path.parent})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_fields_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"query": "q1", "positive": "p1", "negative": "n1", "id": 7},
        {"query": "q2", "positive": "p2", "negatives": ["a", "b"], "instruction": "Find it"},
        "",
        {"query": "q3", "positive": "p3"},
    ])
    rows = load_rows(spec(path)).rows
    assert rows["negatives"] == [["n1"], ["a", "b"], []]
    assert rows["instruction"] == [None, "Find it", None]
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"anchor": "q", "pos": "p", "neg": ["n"]}])
    row = load_rows(spec(mapped, columns={"query": "anchor", "positive": "pos", "negatives": "neg"})).rows[0]
    assert (row["query"], row["positive"], row["negatives"]) == ("q", "p", ["n"])


def test_bad_rows_fail_with_file_line_or_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"query": "q1", "positive": "p1"},
        "{not json",
        {"query": "q3"},
        {"query": "q4", "positive": "p4", "negatives": "oops"},
        [1, 2],
        {"query": "q6", "positive": "p6"},
    ])
    with pytest.raises(UserError, match=rf"^{path}:2: not valid JSON"):
        load_rows(spec(path))
    loaded = load_rows(spec(path), on_bad_rows="skip")
    assert loaded.skipped == 4 and loaded.rows["query"] == ["q1", "q6"]
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"query": "q", "positive": "p"}, {"query": "q"}])
    with pytest.raises(UserError, match=rf"^{missing}:2: missing field 'positive'"):
        load_rows(spec(missing))


def test_csv_tsv_and_parquet(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('query,positive,negatives\nq1,"p, one","[""n1"", ""n2""]"\nq2,p2,\nq3,p3\n')
    with pytest.raises(UserError, match=rf"^{csv_path}:4: expected 3 columns, got 2"):
        load_rows(spec(csv_path))
    rows = load_rows(spec(csv_path), on_bad_rows="skip").rows
    assert rows["positive"] == ["p, one", "p2"] and rows["negatives"] == [["n1", "n2"], []]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("query\tpositive\tnegative\nq1\tp1\tn1\n")
    assert load_rows(spec(tsv_path)).rows[0]["negatives"] == ["n1"]
    parquet_path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"query": ["q1", ""], "positive": ["p1", "p2"]}).to_parquet(str(parquet_path))
    with pytest.raises(UserError, match=rf"^{parquet_path}: row 2: field 'query' must be a non-empty string"):
        load_rows(spec(parquet_path))


def test_load_dataset_folder(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"query": f"q{i}", "positive": f"p{i}"} for i in range(3)])
    rows = load_rows(spec(folder, format="hf")).rows
    assert rows["query"] == ["q0", "q1", "q2"]


def test_a_save_to_disk_folder_and_a_hub_layout_task_give_rows(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"anchor": ["q0", "q1"], "pos": ["p0", "p1"]}),
                          "dev": datasets.Dataset.from_dict({"anchor": ["d0"], "pos": ["e0"]})}).save_to_disk(str(saved))
    rows = load_rows(spec(saved, format="hf", columns={"query": "anchor", "positive": "pos"})).rows
    assert (rows["query"], rows["positive"]) == (["q0", "q1"], ["p0", "p1"])
    task = tmp_path / "task"  # MTEB's layout, each configuration saved by its name
    datasets.Dataset.from_list([{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "title": "", "text": "two"}]
                               ).save_to_disk(str(task / "corpus"))
    datasets.Dataset.from_list([{"_id": "1", "text": "first"}, {"_id": "2", "text": "second"}]
                               ).save_to_disk(str(task / "queries"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([
        {"query-id": "1", "corpus-id": "d1", "score": 1}, {"query-id": "2", "corpus-id": "d9", "score": 1}])}
    ).save_to_disk(str(task / "default"))
    with pytest.raises(UserError, match=r"task \(default, train\): query 2, document d9: document id not in the corpus"):
        load_rows(spec(task, format="mteb"))
    loaded = load_rows(spec(task, format="mteb"), on_bad_rows="skip")
    assert (loaded.rows["query"], loaded.rows["positive"], loaded.skipped) == (["first"], ["T one"], 1)


def test_beir_folder_gives_pairs_with_titles(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [
        {"_id": "d1", "title": "Title", "text": "body one"},
        {"_id": "d2", "title": "", "text": "body two"},
    ])
    write_jsonl(folder / "queries.jsonl", [{"_id": "1", "text": "first"}, {"_id": "2", "text": "second"}])
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n2\td2\t2\n")
    rows = load_rows(spec(folder)).rows
    assert list(zip(rows["query"], rows["positive"])) == [("first", "Title body one"), ("second", "body two")]
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\td9\t1\n2\td2\t1\n")
    with pytest.raises(UserError, match="query 1, document d9: document id not in the corpus"):
        load_rows(spec(folder))
    assert load_rows(spec(folder), on_bad_rows="skip").skipped == 1


def test_scored_pairs_threshold(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("score\tsentence1\tsentence2\n5.0\ta\tb\n3.9\tc\td\n4.0\te\tf\nhigh\tg\th\n")
    with pytest.raises(UserError, match=rf"^{path}:5: score 'high' is not a number"):
        load_rows(spec(path, format="scored_pairs"))
    rows = load_rows(spec(path, format="scored_pairs", score_threshold=4.0), on_bad_rows="skip").rows
    assert list(zip(rows["query"], rows["positive"])) == [("a", "b"), ("e", "f")]


def test_max_rows_keeps_the_first_valid_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": f"q{i}", "positive": f"p{i}"} for i in range(10)])
    assert load_rows(spec(path, max_rows=4)).rows["query"] == ["q0", "q1", "q2", "q3"]


def test_sampler_one_dataset_per_batch_weights_and_determinism():
    sampler = MixedBatchSampler([40, 12, 9], [1.0, 2.0, 0.5], batch_size=4, seed=3)
    assert sampler.counts == [10, 6, 1] and len(sampler) == 17
    offsets = [0, 40, 52, 61]
    first = list(sampler)
    assert len(first) == 17
    sources = []
    for batch in first:
        owners = {next(d for d in range(3) if offsets[d] <= i < offsets[d + 1]) for i in batch}
        assert len(owners) == 1 and len(batch) == 4 and len(set(batch)) == 4
        sources.append(owners.pop())
    assert Counter(sources) == {0: 10, 1: 6, 2: 1}
    assert sorted(i for b, s in zip(first, sources) if s == 0 for i in b) == list(range(40))  # weight 1: each row once
    assert list(MixedBatchSampler([40, 12, 9], [1.0, 2.0, 0.5], 4, seed=3)) == first  # depends on seed+epoch only
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(MixedBatchSampler([40, 12, 9], [1.0, 2.0, 0.5], 4, seed=4)) != first


def test_training_order_runs_epoch_after_epoch_and_leaves_the_sampler_at_the_first():
    sampler = MixedBatchSampler([40, 12, 9], [1.0, 2.0, 0.5], batch_size=4, seed=3)
    first = [i for batch in sampler for i in batch]
    sampler.set_epoch(1)
    second = [i for batch in sampler for i in batch]
    assert training_order(sampler, len(first) + 10) == first + second[:10]
    assert [i for batch in sampler for i in batch] == first


def loaded(tmp_path: Path, name: str, rows: list[dict], **kwargs):
    return load_rows(spec(write_jsonl(tmp_path / f"{name}.jsonl", rows), **kwargs))


def test_hard_negatives_sampled_repeated_or_filled(tmp_path):
    many = loaded(tmp_path, "many", [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}{j}" for j in range(5)]}
                                     for i in range(8)])
    few = loaded(tmp_path, "few", [{"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(8)])
    none = loaded(tmp_path, "none", [{"query": f"q{i}", "positive": "same" if i < 2 else f"p{i}"} for i in range(8)])
    data = StageData([many, few, none], batch_size=4, hard_negatives=3, seed=0)
    item = data[0]
    assert len(item["negatives"]) == 3 and len(set(item["negatives"])) == 3
    assert set(item["negatives"]) <= {f"n0{j}" for j in range(5)}
    assert data[8]["negatives"] == ["n0", "n0", "n0"]
    filled = data[16]["negatives"]
    assert len(set(filled)) == 3 and "same" not in filled and all(n.startswith("p") for n in filled)
    again = StageData([many, few, none], batch_size=4, hard_negatives=3, seed=0)
    assert [again[i]["negatives"] for i in range(24)] == [data[i]["negatives"] for i in range(24)]
    data.set_epoch(1)
    assert data.batch_sampler.epoch == 1
    assert [data[i]["negatives"] for i in range(8)] != [again[i]["negatives"] for i in range(8)]


@pytest.fixture(scope="module")
def tiny_embedder(tiny_qwen2):
    return Embedder.from_pretrained(tiny_qwen2, pooling="mean")


def test_collator_layout(tmp_path, tiny_embedder):
    rows = [{"query": f"the cat {i}", "positive": "a dog" if i == 0 else f"the mat {i}",
             "negatives": [f"onion {i}", "a dog"]} for i in range(3)]
    part = loaded(tmp_path, "d", rows, instruction="Retrieve passages", in_batch_negatives=False)
    data = StageData([part], batch_size=3, hard_negatives=2, seed=0)
    collator = ContrastiveCollator(tiny_embedder, max_length=32)
    items = [data[i] for i in range(3)]
    batch = collator(items)
    assert batch["queries"]["input_ids"].shape[0] == 3
    assert batch["documents"]["input_ids"].shape[0] == 3 * (1 + 2)
    documents = [item["positive"] for item in items] + [n for item in items for n in item["negatives"]]
    assert batch["document_ids"].tolist() == [text_id(t) for t in documents]
    assert batch["document_ids"][3 + 1 * 2 + 1] == text_id(items[1]["negatives"][1])  # row B + i*k + j
    assert batch["query_ids"].tolist() == [text_id(item["query"]) for item in items]
    assert batch["in_batch_negatives"] is False
    assert batch["document_ids"].dtype == torch.long and (batch["document_ids"] >= 0).all()
    # the instruction goes into queries (through the query template) but not into pooling; documents get none
    expected = tiny_embedder.tokenize([i["query"] for i in items], instructions=["Retrieve passages"] * 3, max_length=32)
    for key, value in expected.items():
        assert torch.equal(batch["queries"][key], value)
    q = batch["queries"]
    assert (q["attention_mask"].sum(1) > q["pool_mask"].sum(1)).all()
    assert torch.equal(batch["documents"]["input_ids"], tiny_embedder.tokenize(documents, max_length=32, kind="document")["input_ids"])
    mixed = dict(items[1], source=1)
    with pytest.raises(ValueError, match="one dataset"):
        collator([items[0], mixed])


def test_situated_positives_pool_their_span_in_context(tmp_path, tiny_embedder):
    context = "Aspirin inhibits cyclooxygenase. It lowers fever. Ibuprofen does too."
    spans = [[33, 49], [50, 69], [0, 32]]  # "It lowers fever.", "Ibuprofen does too.", the first sentence
    rows = [{"query": f"claim {i}", "positive": context, "positive_span": span} for i, span in enumerate(spans)]
    rows.append({"query": "plain", "positive": "A plain positive."})
    part = loaded(tmp_path, "s", rows)
    assert part.rows["positive_span"] == [*spans, []]
    items = [StageData([part], batch_size=4, hard_negatives=0, seed=0)[i] for i in range(4)]
    assert items[0]["positive_span"] == (33, 49) and items[3]["positive_span"] is None
    batch = ContrastiveCollator(tiny_embedder, max_length=64, keep_texts=True)(items)
    documents = batch["documents"]
    located = tiny_embedder.prompt_tokenizer.locate_text(context, kind="document")
    assert documents["input_ids"][0, :len(located.ids)].tolist() == located.ids  # the whole context goes in
    pooled = [tiny_embedder.tokenizer.decode([t for t, keep in zip(documents["input_ids"][i], documents["pool_mask"][i])
                                              if keep]).strip() for i in range(3)]
    assert pooled == [context[a:b] for a, b in spans]  # only the span is pooled
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(tiny_embedder.forward(documents), dim=-1)[:3].numpy()
    [expected] = tiny_embedder.encode_chunks([context], spans=[[tuple(s) for s in spans]])
    assert abs(vectors - expected.vectors).max() < 1e-5  # the training vector is the inference vector
    # three spans of one context are three documents; the teacher, which has no context, sees the spans
    assert len(set(batch["document_ids"][:3].tolist())) == 3
    assert batch["texts"]["documents"][:4] == [context[a:b] for a, b in spans] + ["A plain positive."]


@pytest.mark.parametrize(("span", "message"), [
    ([5, 500], r"s.jsonl:1: 'positive_span' \[5, 500\] is not a non-blank span of the positive \(9 characters\)"),
    ([3, 4], r"'positive_span' \[3, 4\] is not a non-blank span"),
    ("x", r"s.jsonl:1: 'positive_span' must be \[start, end\] character offsets"),
    ([1.5, 3], r"'positive_span' must be \[start, end\]"),
])
def test_bad_positive_spans_name_the_row(tmp_path, span, message):
    path = write_jsonl(tmp_path / "s.jsonl", [{"query": "q", "positive": "abc defgh", "positive_span": span}])
    with pytest.raises(UserError, match=message):
        load_rows(spec(path))
