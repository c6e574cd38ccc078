"""LIMIT: recall against embedding dimension, beside BM25 (where the paper's dimension bound bites).

Each model encodes the LIMIT documents and queries once (`llm2emb.evaluate.limit`); its vectors are then cut to each
of --dims leading components and renormalised (Matryoshka truncation; for a model not trained for it the cut is
harsher than a trained small dimension) and scored by recall@2/10/100. BM25 is the lexical baseline the paper
shows solving the task. Document vectors go through llm2emb's embedding cache (--cache-dir, default LLM2EMB_CACHE's
embeddings/) block by block, so a stopped run on the large task resumes where it stopped. One table row per
(model, dimension):

    python -m scripts.bench_limit runs/compare51/default-s1/run/model all-minilm-l6-v2 --size small \
        --dims 16 32 64 128 256 384 576 --json benchmarks/limit_small.json --table benchmarks/limit_small.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="llm2emb folders, sentence-transformers folders or asset aliases")
    p.add_argument("--size", default="small", choices=["small", "large"])
    p.add_argument("--dims", nargs="+", type=int, default=[16, 32, 64, 128, 256, 384, 576])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", help="embedding cache folder (default: llm2emb's)")
    p.add_argument("--json")
    p.add_argument("--table")
    return p.parse_args(argv)


METRICS = ("recall@2", "recall@10", "recall@100")


def main(argv=None) -> None:
    args = parse_args(argv)
    from llm2emb.assets import resolve_asset
    from llm2emb.evaluate.bm25 import bm25_ranking
    from llm2emb.evaluate.cache import EmbeddingCache, model_fingerprint
    from llm2emb.evaluate.encoders import as_encoder, normalized
    from llm2emb.evaluate.limit import limit_task
    from llm2emb.evaluate.metrics import retrieval_scores
    from llm2emb.evaluate.retrieval import encode_corpus
    from llm2emb.evaluate.runner import load_model
    from llm2emb.evaluate.search import top_k

    data = limit_task(args.size)
    cache = EmbeddingCache(args.cache_dir)
    rows = []
    started = time.perf_counter()
    bm25 = retrieval_scores(bm25_ranking(data, k=100), data.qrels, METRICS)
    rows.append({"model": "BM25 (bm25s)", "dim": None, **{m: round(v, 2) for m, v in bm25.items()},
                 "seconds": round(time.perf_counter() - started, 1)})
    for name in args.models:
        started = time.perf_counter()
        encoder = as_encoder(load_model(resolve_asset(name)), args.batch_size)
        documents, cached = encode_corpus(encoder, data, cache, model_fingerprint(encoder))
        queries = np.asarray(encoder.encode_queries(data.queries), np.float32)
        seconds = "cached" if cached else round(time.perf_counter() - started, 1)
        for dim in sorted({d for d in args.dims if d <= documents.shape[1]} | {documents.shape[1]}):
            ranked = top_k(normalized(queries[:, :dim]), normalized(documents[:, :dim]), 100)[0]
            ranking = {q: [data.doc_ids[i] for i in row] for q, row in zip(data.query_ids, ranked)}
            scores = retrieval_scores(ranking, data.qrels, METRICS)
            rows.append({"model": name, "dim": dim, **{m: round(v, 2) for m, v in scores.items()},
                         "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| model | dim | recall@2 | recall@10 | recall@100 |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dim'] or '-'} | {r['recall@2']:.2f} | {r['recall@10']:.2f} | {r['recall@100']:.2f} |"
              for r in rows]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"task": data.name, "documents": len(data.documents),
                                               "queries": len(data.queries), "rows": rows}, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
