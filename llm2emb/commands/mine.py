"""`llm2emb mine`: ANCE-style hard negatives from the current model, with positive-aware false-negative filtering.

Embed the corpus and the queries with the model, retrieve each query's top documents by exact search
(`evaluate.search.top_k`), drop the query's positives, keep the candidates inside a rank window, and keep a
candidate only if its score is below `margin` x the positive's score (NV-Retriever's TopK-PercPos rule: a
document almost as close as the positive is more likely an unlabelled positive than a negative). The output is
JSONL rows `{query, positive, negatives, instruction?}`, one per (query, positive) pair, which a recipe's
dataset reads directly (`path: negatives.jsonl`, `hard_negatives: k`).

Queries and positives come from a BEIR layout (`--queries queries.jsonl --qrels qrels.tsv`, relevance > 0) or
from training pairs (`--pairs` with `query`, `positive` and optional `instruction` fields, any format the
recipe's datasets read; the CLI and a recipe's `mine:` read them with `llm2emb.train.data.read_pairs` and pass the
`Pair`s in, so this module does not depend on the training package). Negatives are `--corpus` documents (BEIR corpus.jsonl: title and text joined as the
BEIR loaders join them); a document whose text equals one of the query's positives is never a negative.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm2emb.errors import UserError
from llm2emb.files import atomic_path
from llm2emb.model.tokenization import locate_texts


@dataclass
class MiningStats:
    rows: int
    queries: int
    full_rows: int
    """Rows that got all `num_negatives` negatives."""
    masked_by_margin: int
    """Candidates inside the rank window dropped as likely false negatives."""

    def format(self, out: str | Path) -> str:
        return (f"wrote {out}: {self.rows} rows for {self.queries} queries, {self.full_rows} with every negative; "
                f"{self.masked_by_margin} candidates dropped by the margin rule")


@dataclass
class Pair:
    query: str
    positive: str
    instruction: str | None = None


def parse_window(text: str) -> tuple[int, int]:
    """'10:100' -> (10, 100): skip the 10 best non-positive candidates, look no further than rank 100."""
    start, sep, end = text.partition(":")
    try:
        window = (int(start or 0), int(end))
    except ValueError:
        raise UserError(f"--rank-window {text}: expected START:END, e.g. 10:100") from None
    if not sep or not 0 <= window[0] < window[1]:
        raise UserError(f"--rank-window {text}: expected 0 <= START < END, e.g. 10:100")
    return window


def select_negatives(
    ranked: Sequence[int],
    scores: Sequence[float],
    positives: set[int],
    positive_score: float,
    window: tuple[int, int],
    margin: float | None,
    count: int,
) -> tuple[list[int], int]:
    """The first `count` candidates of a ranking that are not positives, lie in `window` (0-based ranks of the
    positive-free ranking, end excluded) and score below margin x positive_score; plus how many in the window
    the margin dropped."""
    kept, dropped = [], 0
    candidates = [(index, score) for index, score in zip(ranked, scores) if index not in positives]
    for index, score in candidates[window[0] : window[1]]:
        if margin is not None and score >= margin * positive_score:
            dropped += 1
        elif len(kept) < count:
            kept.append(index)
    return kept, dropped


def read_pairs_from_beir(queries_path: Path, corpus_ids: dict[str, int], documents: list[str],
                         qrels_path: Path) -> list[Pair]:
    """(query, positive) for every qrel with relevance > 0, in queries.jsonl order."""
    from llm2emb.readers import BadRow, qrel_pairs, read_jsonl, read_qrels

    qrels = read_qrels(qrels_path)
    queries = {str(row["_id"]): row["text"] for row in read_jsonl(queries_path, ("_id", "text"))}
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise UserError(f"{queries_path}: {len(missing)} query id(s) of {qrels_path} are absent, e.g. {missing[0]!r}")
    corpus = {doc_id: documents[index] for doc_id, index in corpus_ids.items()}
    pairs = []
    for _, query, document in qrel_pairs(queries, corpus, qrels, qrels_path):
        if isinstance(document, BadRow):
            raise UserError(str(document))
        pairs.append(Pair(query, document))
    return pairs


def mine(
    model,
    corpus: str | Path,
    out: str | Path,
    queries: str | Path | None = None,
    qrels: str | Path | None = None,
    pairs: Sequence[Pair] | None = None,
    top_k: int = 100,
    rank_window: tuple[int, int] | None = None,
    margin: float | None = 0.95,
    num_negatives: int = 7,
    instruction: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> MiningStats:
    """Mine hard negatives with `model` (an Embedder or a path for `Embedder.from_pretrained`); see the module doc.

    `rank_window` defaults to (0, top_k). `instruction` goes on every query (a pair's own instruction wins) and
    is written into the rows. Give `queries` and `qrels` (BEIR files) or `pairs` (`Pair`s already read).
    """
    from llm2emb.evaluate.search import top_k as search
    from llm2emb.model.embedder import Embedder
    from llm2emb.readers import document_text, read_jsonl

    if (qrels is None) == (pairs is None):
        raise UserError("give exactly one of --qrels (with --queries) or --pairs")
    if qrels is not None and queries is None:
        raise UserError("--qrels needs --queries (BEIR queries.jsonl)")
    if pairs is not None and queries is not None:
        raise UserError("--queries goes with --qrels; --pairs already holds the queries")
    for name, value in (("--top-k", top_k), ("--num-negatives", num_negatives), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if margin is not None and margin <= 0:
        raise UserError(f"--margin must be positive (or none), got {margin}")
    window = rank_window or (0, top_k)
    if window[1] > top_k:
        raise UserError(f"--rank-window ends at {window[1]}, beyond --top-k {top_k}")

    rows = read_jsonl(Path(corpus), ("_id", "text"))
    doc_ids = [str(row["_id"]) for row in rows]
    documents = [document_text(row) for row in rows]
    if qrels is not None:
        found = read_pairs_from_beir(Path(queries), {d: i for i, d in enumerate(doc_ids)}, documents, Path(qrels))
    else:
        found = list(pairs)
    if not found:
        raise UserError("no (query, positive) pairs to mine for")
    embedder = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device)

    # One search per distinct (query, instruction); its positives are those of every pair with that query.
    keys = list(dict.fromkeys((p.query, p.instruction or instruction) for p in found))
    slot = {key: i for i, key in enumerate(keys)}
    by_text: dict[str, list[int]] = {}
    for index, text in enumerate(documents):
        by_text.setdefault(text, []).append(index)
    positive_docs: list[set[int]] = [set() for _ in keys]
    for p in found:
        positive_docs[slot[(p.query, p.instruction or instruction)]].update(by_text.get(p.positive, ()))

    with locate_texts(lambda i: f"{corpus}: document {doc_ids[i]}"):
        doc_vectors = _normalized(embedder.encode_documents(documents, batch_size=batch_size))
    query_vectors = np.zeros((len(keys), doc_vectors.shape[1]), dtype=np.float32)
    for instr in dict.fromkeys(k[1] for k in keys):
        rows_with = [i for i, k in enumerate(keys) if k[1] == instr]
        texts = [keys[i][0] for i in rows_with]
        with locate_texts(lambda i, texts=texts: f"query {texts[i]!r:.80}"):
            query_vectors[rows_with] = _normalized(embedder.encode(texts, instruction=instr, batch_size=batch_size))
    positives = list(dict.fromkeys(p.positive for p in found))
    with locate_texts(lambda i: f"positive {positives[i]!r:.80}"):
        positive_vectors = _normalized(embedder.encode_documents(positives, batch_size=batch_size))
    positive_row = {text: i for i, text in enumerate(positives)}
    depth = min(len(documents), top_k + max(len(s) for s in positive_docs))
    ranked, scores = search(query_vectors, doc_vectors, depth)

    stats = MiningStats(rows=0, queries=len(keys), full_rows=0, masked_by_margin=0)
    with atomic_path(out) as staging, staging.open("w", encoding="utf-8") as handle:
        for p in found:
            i = slot[(p.query, p.instruction or instruction)]
            positive_score = float(query_vectors[i] @ positive_vectors[positive_row[p.positive]])
            kept, dropped = select_negatives(ranked[i][: top_k + len(positive_docs[i])].tolist(),
                                             scores[i].tolist(), positive_docs[i], positive_score,
                                             window, margin, num_negatives)
            row = {"query": p.query, "positive": p.positive, "negatives": [documents[j] for j in kept]}
            if p.instruction or instruction:
                row["instruction"] = p.instruction or instruction
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            stats.rows += 1
            stats.full_rows += len(kept) == num_negatives
            stats.masked_by_margin += dropped
    return stats


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
