"""Multi-vector retrieval on SciFact: single vector vs exact late interaction vs MUVERA FDE + re-rank.

One model gives both kinds of vectors: the pooled vector (`encode`) and its token vectors (`encode_tokens`: the
output of its trained late-interaction head when it has one, `late_interaction:` in a recipe; else the last hidden
states of the tokens it pools; normalised). Exact multi-vector scores every document by Chamfer similarity;
FDE + re-rank takes --candidates documents by one inner product with MUVERA's fixed-dimensional encodings and
re-ranks them by exact Chamfer. nDCG@10 and the bytes a document costs (float32) for each:

    python -m scripts.bench_muvera runs/compare51/default-s1/run/model --corpus-sample 1000 --json benchmarks/muvera.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--beir", default=str(DATA / "scifact"))
    p.add_argument("--corpus-sample", type=int)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--k-sim", type=int, default=4)
    p.add_argument("--d-proj", type=int, default=16)
    p.add_argument("--r-reps", type=int, default=20)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights and states")
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from llm2emb import Embedder
    from llm2emb.evaluate import load_beir
    from llm2emb.evaluate.data import subsample_corpus
    from llm2emb.evaluate.metrics import evaluated_queries, retrieval_scores
    from llm2emb.evaluate.search import top_k
    from llm2emb.retrieval.muvera import FdeConfig, Muvera, chamfer, search_fde

    data = load_beir(args.beir, "test")
    if args.corpus_sample:
        data = subsample_corpus(data, args.corpus_sample)
    embedder = Embedder.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    embedder.config.max_length = args.max_length
    counted = set(evaluated_queries(data.qrels))
    query_ids = [q for q in data.query_ids if q in counted]
    texts = [t for q, t in zip(data.query_ids, data.queries) if q in counted]

    def ndcg(indices) -> float:
        ranking = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, indices)}
        return round(retrieval_scores(ranking, data.qrels, ["ndcg@10"])["ndcg@10"], 2)

    rows = []
    started = time.perf_counter()
    single = top_k(embedder.encode(texts, batch_size=args.batch_size),
                   embedder.encode_documents(data.documents, batch_size=args.batch_size), 10)[0]
    rows.append({"system": "single vector (mean pooled)", "ndcg@10": ndcg(single), "bytes_per_document": 4 * embedder.dim,
                 "seconds": round(time.perf_counter() - started, 1)})
    started = time.perf_counter()
    query_tokens = embedder.encode_tokens(texts, batch_size=args.batch_size)
    document_tokens = embedder.encode_tokens(data.documents, kind="document", batch_size=args.batch_size)
    encode_seconds = time.perf_counter() - started
    token_dim = document_tokens[0].shape[1]  # the head's width, or the hidden size without one
    exact = np.array([np.argsort([-chamfer(q, d) for d in document_tokens], kind="stable")[:10] for q in query_tokens])
    tokens_per_document = float(np.mean([len(d) for d in document_tokens]))
    rows.append({"system": "exact multi-vector (Chamfer)", "ndcg@10": ndcg(exact),
                 "bytes_per_document": round(4 * token_dim * tokens_per_document), "token_dim": token_dim,
                 "seconds": round(time.perf_counter() - started, 1)})
    config = FdeConfig(token_dim, args.k_sim, args.d_proj, args.r_reps)
    muvera = Muvera(config)
    started = time.perf_counter()
    fdes = np.stack([muvera.document(d) for d in document_tokens])
    ranked = search_fde(muvera, query_tokens, document_tokens, k=10, candidates=args.candidates, document_fdes=fdes)
    rows.append({"system": f"MUVERA FDE (k_sim {args.k_sim}, d_proj {args.d_proj}, r_reps {args.r_reps}) + "
                           f"Chamfer re-rank of {args.candidates}", "ndcg@10": ndcg(ranked),
                 "bytes_per_document": 4 * config.size, "seconds": round(time.perf_counter() - started + encode_seconds, 1)})
    fde_only = np.array([np.argsort(-(fdes @ muvera.query(q)), kind="stable")[:10] for q in query_tokens])
    rows.append({"system": "MUVERA FDE alone (no re-rank)", "ndcg@10": ndcg(fde_only),
                 "bytes_per_document": 4 * config.size, "seconds": None})
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "task": data.name, "documents": len(data.documents),
                                               "max_length": args.max_length, "dtype": args.dtype, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
