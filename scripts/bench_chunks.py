"""Situated chunks against plain chunks and whole documents: SciFact test, abstracts split into sentences.

The question a user with long documents asks: index sentences (precise, but a sentence alone loses its subject),
whole documents (context, but one vector for many claims), or sentences embedded in their document? Each condition
ranks whole abstracts for each claim; a chunked document scores as its best chunk (max over chunks).

    whole     one vector per abstract (title and text), `encode_documents` at --window tokens
    plain     one vector per sentence, each encoded alone (`encode_documents` on the sentence text)
    situated  one vector per sentence, pooled from a forward over its abstract (`encode_chunks`, --window tokens)

Queries are the claims, encoded alike in all three (no instruction unless --query-instruction). Each condition
writes `<out>/<condition>.json` and is skipped when that exists, so conditions can run as separate processes side
by side (`--conditions whole` in one, `--conditions plain situated` in another) and a table is made from what is
there:

    python -m scripts.bench_chunks runs/compare51/default-s1/run/model --corpus-sample 1000 --out runs/chunks \
        --conditions whole plain situated --table benchmarks/chunks.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONDITIONS = ("whole", "plain", "situated")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="llm2emb model folder")
    p.add_argument("--beir", default=str(DATA / "scifact"))
    p.add_argument("--split", default="test")
    p.add_argument("--corpus-sample", type=int, help="documents kept (every relevant one + seeded random others)")
    p.add_argument("--window", type=int, default=2048,
                   help="tokens per forward (whole documents and situated); SciFact's longest abstract has 1,944")
    p.add_argument("--query-instruction")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True, help="folder for one JSON per condition")
    p.add_argument("--table", help="write the markdown table of every condition found in --out here")
    return p.parse_args(argv)


def best_chunk_ranking(queries: np.ndarray, chunks: np.ndarray, owner: np.ndarray, documents: int, k: int = 10):
    """Top-k documents per query when a document scores as its best chunk."""
    scores = np.full((len(queries), documents), -np.inf, dtype=np.float32)
    block = queries @ chunks.T
    for column in range(documents):  # documents hold few chunks: a max over each document's columns
        members = np.flatnonzero(owner == column)
        scores[:, column] = block[:, members].max(axis=1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def run_condition(args, condition: str, data, embedder) -> dict:
    from llm2emb.evaluate.metrics import evaluated_queries, retrieval_scores
    from llm2emb.evaluate.search import top_k
    from llm2emb.retrieval.chunking import sentence_spans

    counted = set(evaluated_queries(data.qrels))
    query_ids = [q for q in data.query_ids if q in counted]
    texts = [t for q, t in zip(data.query_ids, data.queries) if q in counted]
    started = time.perf_counter()
    queries = embedder.encode(texts, instruction=args.query_instruction, batch_size=args.batch_size)
    if condition == "whole":
        vectors = embedder.encode_documents(data.documents, batch_size=args.batch_size)
        ranked = top_k(queries, vectors, 10)[0]
        chunk_count = len(data.documents)
    else:
        spans = [sentence_spans(text) for text in data.documents]
        owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(spans)])
        if condition == "plain":
            sentences = [text[a:b] for text, own in zip(data.documents, spans) for a, b in own]
            vectors = embedder.encode_documents(sentences, batch_size=args.batch_size)
        else:
            pieces = embedder.encode_chunks(data.documents, spans=spans, window=args.window, batch_size=args.batch_size)
            vectors = np.concatenate([piece.vectors for piece in pieces])
        ranked = best_chunk_ranking(queries, vectors, owner, len(data.documents))
        chunk_count = len(vectors)
    ranking = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, ranked)}
    scores = retrieval_scores(ranking, data.qrels, ["ndcg@10", "recall@10"])
    return {"condition": condition, "ndcg@10": round(scores["ndcg@10"], 2), "recall@10": round(scores["recall@10"], 2),
            "vectors": chunk_count, "documents": len(data.documents), "queries": len(query_ids),
            "window": args.window, "seconds": round(time.perf_counter() - started, 1), "model": args.model,
            "task": data.name}


def table(out: Path) -> str:
    lines = ["| condition | nDCG@10 | recall@10 | vectors | documents | seconds |", "|---|---|---|---|---|---|"]
    for condition in CONDITIONS:
        path = out / f"{condition}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            lines.append(f"| {condition} | {r['ndcg@10']:.2f} | {r['recall@10']:.2f} | {r['vectors']} | "
                         f"{r['documents']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from llm2emb import Embedder
    from llm2emb.evaluate import load_beir
    from llm2emb.evaluate.data import subsample_corpus
    from scripts.conditions import pending_conditions

    out, pending = pending_conditions(args.out, args.conditions, args.threads)
    if pending:
        data = load_beir(args.beir, args.split)
        if args.corpus_sample:
            data = subsample_corpus(data, args.corpus_sample)
        embedder = Embedder.from_pretrained(args.model, torch_dtype=torch.float32)
        embedder.config.max_length = args.window  # whole documents and plain sentences: the same token limit
        for condition in pending:
            result = run_condition(args, condition, data, embedder)
            (out / f"{condition}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result), flush=True)
    if args.table:
        Path(args.table).write_text(table(out) + "\n")
        print(table(out))


if __name__ == "__main__":
    main()
