"""Loaders for the two evaluation layouts: STS pairs (TSV) and BEIR retrieval folders.

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
    qrels = read_qrels(directory / "qrels" / f"{split}.tsv")
    corpus = read_jsonl(directory / "corpus.jsonl", ("_id", "text"), BEIR_LAYOUT)
    doc_ids = [str(row["_id"]) for row in corpus]
    if len(set(doc_ids)) != len(doc_ids):
        raise UserError(f"{directory / 'corpus.jsonl'}: duplicate _id values")
    documents = [document_text(row) for row in corpus]
    queries = {str(row["_id"]): row["text"]
               for row in read_jsonl(directory / "queries.jsonl", ("_id", "text"), BEIR_LAYOUT)}
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise UserError(f"{directory / 'queries.jsonl'}: {len(missing)} query id(s) of qrels/{split}.tsv are absent, "
                        f"e.g. {missing[0]!r}")
    relevant = {doc for judged in qrels.values() for doc, score in judged.items() if score > 0}
    absent = sorted(relevant - set(doc_ids)) if evaluated else []
    if absent:
        raise UserError(f"{directory / 'corpus.jsonl'}: {len(absent)} document id(s) judged relevant in "
                        f"qrels/{split}.tsv are absent, e.g. {absent[0]!r}")
    if not relevant:
        raise UserError(f"{directory / 'qrels' / (split + '.tsv')}: no query has a relevant document (score > 0)")
    query_ids = [q for q in queries if q in qrels]
    return BeirData(
        name=directory.name,
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
