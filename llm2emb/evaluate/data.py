"""Loaders for the evaluation data: STS pairs (a TSV, or a table through `datasets`) and retrieval tasks (a BEIR
folder, or MTEB's hub layout through `datasets`).

Every malformed input fails with the file and line, so a user fixes the data rather than reading a traceback.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from llm2emb.errors import UserError
from llm2emb.readers import document_text, read_jsonl, read_qrels, reading

BEIR_LAYOUT = " (BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"


@dataclass
class StsData:
    """Sentence pairs with gold similarity scores."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]


@dataclass
class BeirData:
    """A retrieval task: documents (title and text already joined), queries of one split, graded qrels."""

    name: str
    split: str
    doc_ids: list[str]
    documents: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, float]]
    corpus_hash: str = field(default="", repr=False)
    """sha256 of the documents in order: the corpus half of the embedding-cache key."""


@dataclass
class BeirSources:
    """Where a retrieval task's three parts came from, for its error lines."""

    corpus: str
    queries: str
    qrels: str


def load_sts(path: str | Path) -> StsData:
    """Read a TSV with the header `score  sentence1  sentence2` (columns in any order; extra columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: STS file not found")
    with reading(path), path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        needed = ("score", "sentence1", "sentence2")
        if header is None or not set(needed) <= set(header):
            raise UserError(f"{path}:1: expected a header with columns {', '.join(needed)}, got {header}")
        col = {name: header.index(name) for name in needed}
        data = StsData(f"{path.parent.name}/{path.stem}", [], [], [])
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < len(header):
                raise UserError(f"{path}:{line}: expected {len(header)} tab-separated columns, got {len(row)}")
            try:
                score = float(row[col["score"]])
            except ValueError:
                raise UserError(f"{path}:{line}: score {row[col['score']]!r} is not a number") from None
            data.scores.append(score)
            data.sentences1.append(row[col["sentence1"]])
            data.sentences2.append(row[col["sentence2"]])
    if len(data.scores) < 2:
        raise UserError(f"{path}: needs at least two sentence pairs")
    return data


def load_sts_table(path: str, subset: str | None = None, split: str = "test") -> StsData:
    """STS pairs through `datasets` (`sentence-transformers/stsb`: columns sentence1, sentence2, score; the
    score's scale does not matter to Spearman's rank correlation)."""
    from llm2emb.hf_tables import column_values, load_table

    name = f"{path} ({split})"
    columns = column_values(load_table(path, subset, split), ("sentence1", "sentence2", "score"), name)
    for row, values in enumerate(zip(columns["sentence1"], columns["sentence2"], columns["score"]), start=1):
        if not all(isinstance(text, str) for text in values[:2]) or not isinstance(values[2], int | float):
            raise UserError(f"{name}: row {row}: expected two strings and a numeric score, got {values!r:.80}")
    if len(columns["score"]) < 2:
        raise UserError(f"{name}: needs at least two sentence pairs")
    return StsData(f"{Path(path).name}/{split}", list(columns["sentence1"]), list(columns["sentence2"]),
                   [float(score) for score in columns["score"]])


def corpus_hash(doc_ids: list[str], documents: list[str]) -> str:
    digest = hashlib.sha256()
    for doc_id, text in zip(doc_ids, documents):
        digest.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


def load_beir(directory: str | Path, split: str = "test", evaluated: bool = True) -> BeirData:
    """Load a BEIR folder; keeps only the queries that appear in the split's qrels. `evaluated`: it is scored, so
    a relevant document missing from the corpus (a corpus cut short) is refused; training rows check their pairs
    one by one instead (`on_bad_rows` may skip them)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: BEIR folder not found")
    qrels_file = directory / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_file)
    corpus = read_jsonl(directory / "corpus.jsonl", ("_id", "text"), BEIR_LAYOUT)
    queries = {str(row["_id"]): row["text"]
               for row in read_jsonl(directory / "queries.jsonl", ("_id", "text"), BEIR_LAYOUT)}
    return retrieval_task(directory.name, split, [str(row["_id"]) for row in corpus],
                          [document_text(row) for row in corpus], queries, qrels, evaluated,
                          BeirSources(str(directory / "corpus.jsonl"), str(directory / "queries.jsonl"),
                                      str(qrels_file)))


MTEB_LAYOUT = "MTEB's hub layout: configurations corpus (_id, title, text), queries (_id, text), default (qrels)"


def load_mteb(path: str, split: str = "test", evaluated: bool = True) -> BeirData:
    """A retrieval task in MTEB's hub layout (`mteb/scifact`): configurations `corpus` and `queries` and the qrels
    (`query-id`, `corpus-id`, `score`) as configuration `default`, one split per evaluation split; a hub id, a
    local copy of the repository, or a folder holding each configuration's `save_to_disk` copy by its name."""
    from llm2emb.hf_tables import column_values, load_table

    corpus_table = load_table(path, "corpus")
    corpus = column_values(corpus_table, ("_id", "text"), f"{path} (corpus; {MTEB_LAYOUT})")
    titles = corpus_table["title"] if "title" in corpus_table.column_names else [""] * len(corpus["_id"])
    documents = [document_text({"title": title, "text": text}) for title, text in zip(titles, corpus["text"])]
    query_rows = column_values(load_table(path, "queries"), ("_id", "text"), f"{path} (queries; {MTEB_LAYOUT})")
    judged = column_values(load_table(path, "default", split), ("query-id", "corpus-id", "score"),
                           f"{path} (default, {split}; {MTEB_LAYOUT})")
    qrels: dict[str, dict[str, float]] = {}
    for query_id, doc_id, score in zip(judged["query-id"], judged["corpus-id"], judged["score"]):
        qrels.setdefault(str(query_id), {})[str(doc_id)] = float(score)
    return retrieval_task(Path(path).name, split, [str(doc_id) for doc_id in corpus["_id"]], documents,
                          {str(q): text for q, text in zip(query_rows["_id"], query_rows["text"])}, qrels, evaluated,
                          BeirSources(f"{path} (corpus)", f"{path} (queries)", f"{path} (default, {split})"))


def retrieval_task(name: str, split: str, doc_ids: list[str], documents: list[str], queries: dict[str, str],
                   qrels: dict[str, dict[str, float]], evaluated: bool, sources: BeirSources) -> BeirData:
    """The checks every retrieval task passes, whatever its layout: unique document ids, every judged query
    present, (when `evaluated`) every relevant document in the corpus, and at least one relevant judgement."""
    if len(set(doc_ids)) != len(doc_ids):
        raise UserError(f"{sources.corpus}: duplicate _id values")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise UserError(f"{sources.queries}: {len(missing)} query id(s) of {sources.qrels} are absent, "
                        f"e.g. {missing[0]!r}")
    relevant = {doc for judged in qrels.values() for doc, score in judged.items() if score > 0}
    absent = sorted(relevant - set(doc_ids)) if evaluated else []
    if absent:
        raise UserError(f"{sources.corpus}: {len(absent)} document id(s) judged relevant in "
                        f"{sources.qrels} are absent, e.g. {absent[0]!r}")
    if not relevant:
        raise UserError(f"{sources.qrels}: no query has a relevant document (score > 0)")
    query_ids = [q for q in queries if q in qrels]
    return BeirData(
        name=name,
        split=split,
        doc_ids=doc_ids,
        documents=documents,
        query_ids=query_ids,
        queries=[queries[q] for q in query_ids],
        qrels=qrels,
        corpus_hash=corpus_hash(doc_ids, documents),
    )


def subsample_corpus(data: BeirData, size: int, seed: int = 0) -> BeirData:
    """A smaller retrieval task: every document relevant to a query of the split, plus seeded random others.

    For quick comparisons on slow hardware. Scores are higher than on the full corpus (fewer distractors), so
    compare only numbers measured on the same subsample.
    """
    import random

    wanted = {doc for judged in data.qrels.values() for doc, rel in judged.items() if rel > 0}
    keep = [i for i, doc in enumerate(data.doc_ids) if doc in wanted]
    if size < len(keep):
        raise UserError(f"corpus sample of {size} is smaller than the {len(keep)} relevant documents")
    others = [i for i in range(len(data.doc_ids)) if data.doc_ids[i] not in wanted]
    keep = sorted(keep + random.Random(seed).sample(others, min(size - len(keep), len(others))))
    doc_ids = [data.doc_ids[i] for i in keep]
    documents = [data.documents[i] for i in keep]
    return BeirData(f"{data.name}[{len(keep)} docs, seed {seed}]", data.split, doc_ids, documents,
                    data.query_ids, data.queries, data.qrels, corpus_hash(doc_ids, documents))
