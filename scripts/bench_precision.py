"""Retrieval quality and storage of compressed vectors: llm2emb.retrieval.precision against sentence-transformers'
`quantize_embeddings` on the same float vectors, alone and with Matryoshka truncation.

The corpus and queries are encoded once in float32; every precision then quantizes those vectors (int8/uint8
calibrated on the corpus, as `llm2emb eval --precision` does), ranks with `search_codes` and scores nDCG@10. The
sentence-transformers column quantizes with its function (truncation to the level below, instead of rounding) and
is ranked by the same search, so the column differs only in the codes.

    python -m scripts.bench_precision --model all-minilm-l6-v2 --beir ../shared/data/scifact --dims 384 128 \
        --json benchmarks/precision_scifact.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="llm2emb folder, sentence-transformers folder or asset alias")
    p.add_argument("--beir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--dims", type=int, nargs="+", help="Matryoshka dims to truncate to (default: the full width)")
    p.add_argument("--rescore", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from sentence_transformers.quantization import quantize_embeddings

    from llm2emb.assets import resolve_asset
    from llm2emb.evaluate import load_beir
    from llm2emb.evaluate.encoders import as_encoder, normalized
    from llm2emb.evaluate.metrics import evaluated_queries, retrieval_scores
    from llm2emb.evaluate.runner import load_model
    from llm2emb.evaluate.search import search_codes
    from llm2emb.retrieval.precision import bytes_per_vector, calibration_ranges, quantize

    data = load_beir(args.beir, args.split)
    encoder = as_encoder(load_model(resolve_asset(args.model), max_length=args.max_length), 32)
    counted = set(evaluated_queries(data.qrels))
    query_ids = [q for q in data.query_ids if q in counted]
    texts = [t for q, t in zip(data.query_ids, data.queries) if q in counted]
    corpus_full = np.asarray(encoder.encode_documents(data.documents), np.float32)
    queries_full = np.asarray(encoder.encode_queries(texts), np.float32)

    def ndcg(indices):
        ranking = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, indices)}
        return round(retrieval_scores(ranking, data.qrels, ["ndcg@10"])["ndcg@10"], 2)

    rows = []
    for dim in args.dims or [corpus_full.shape[1]]:
        corpus, queries = normalized(corpus_full[:, :dim]), normalized(queries_full[:, :dim])
        ranges = calibration_ranges(corpus)
        for precision, rescore in [("float32", None), ("float16", None), ("int8", None), ("uint8", None),
                                   ("binary", None), ("binary", args.rescore)]:
            ours = search_codes(queries, quantize(corpus, precision, ranges), precision, 10, ranges, rescore)[0]
            row = {"dim": dim, "precision": precision, "rescore": rescore,
                   "bytes_per_vector": bytes_per_vector(precision, dim), "ndcg@10": ndcg(ours)}
            if precision in ("int8", "uint8", "binary"):
                theirs_codes = quantize_embeddings(corpus, precision, ranges=ranges)
                # Their queries, quantized with their function too, ranked by the same search.
                theirs = search_codes(queries, theirs_codes, precision, 10, ranges, rescore,
                                      quantizer=lambda v, p, r: quantize_embeddings(v, p, ranges=r))[0]
                row["ndcg@10_sentence_transformers"] = ndcg(theirs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "task": f"{data.name}/{args.split}",
                                               "documents": len(data.documents), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
