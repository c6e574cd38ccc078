"""Retrieval evaluation on a BEIR folder: exact search over the whole corpus, then nDCG / Recall / MRR."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm2emb.errors import UserError
from llm2emb.evaluate.cache import EmbeddingCache
from llm2emb.evaluate.data import BeirData, corpus_hash
from llm2emb.evaluate.encoders import as_encoder, normalized
from llm2emb.evaluate.metrics import DEFAULT_RETRIEVAL_METRICS, evaluated_queries, retrieval_scores
from llm2emb.evaluate.results import TaskResult
from llm2emb.evaluate.search import search_codes, top_k
from llm2emb.model.spread import degenerate_warning
from llm2emb.model.tokenization import locate_texts
from llm2emb.retrieval.precision import (
    bytes_per_vector,
    calibration_ranges,
    check_precision,
    needs_ranges,
    quantize,
)

CORPUS_BLOCK = 8192
"""Documents encoded and cached at a time when a corpus is larger: a stopped evaluation resumes at the first block it
had not finished instead of encoding everything again (LIMIT large, 50,000 documents, is hours on a CPU)."""


def encode_corpus(
    encoder: Any,
    data: BeirData,
    cache: EmbeddingCache | None = None,
    fingerprint: str | None = None,
    settings: dict[str, Any] | None = None,
    block: int = CORPUS_BLOCK,
) -> tuple[Any, bool]:
    """Document embeddings (normalised), from the cache when this model already encoded this corpus.

    `settings` holds whatever else changes the vectors (max length, dimension); it joins the cache key. A corpus
    longer than `block` is encoded block by block, each block cached as it is done and dropped once the whole
    matrix is. Returns (embeddings, came_from_cache).
    """
    if cache is None or fingerprint is None:
        return _encode_documents(encoder, data, 0, len(data.documents)), False
    settings = settings or {}
    key = EmbeddingCache.key(fingerprint, data.corpus_hash, **settings)
    hit = cache.get(key, len(data.documents))
    if hit is not None:
        return hit, True
    if len(data.documents) <= block:
        vectors = _encode_documents(encoder, data, 0, len(data.documents))
        cache.put(key, vectors)
        return vectors, False
    parts, block_keys = [], []
    for start in range(0, len(data.documents), block):
        stop = min(start + block, len(data.documents))
        block_key = EmbeddingCache.key(
            fingerprint, corpus_hash(data.doc_ids[start:stop], data.documents[start:stop]), block=True, **settings
        )
        part = cache.get(block_key, stop - start)
        if part is None:
            part = _encode_documents(encoder, data, start, stop)
            cache.put(block_key, part)
        parts.append(part)
        block_keys.append(block_key)
    vectors = np.concatenate(parts)
    cache.put(key, vectors)
    for block_key in block_keys:
        cache.path(block_key).unlink(missing_ok=True)
    return vectors, False


def _encode_documents(encoder: Any, data: BeirData, start: int, stop: int) -> np.ndarray:
    with locate_texts(lambda i: f"{data.name}: corpus document {data.doc_ids[start + i]}"):
        return normalized(encoder.encode_documents(data.documents[start:stop]))


def evaluate_retrieval(
    model: Any,
    data: BeirData,
    query_instruction: str | None = None,
    metrics: Sequence[str] = DEFAULT_RETRIEVAL_METRICS,
    batch_size: int | None = None,
    cache: EmbeddingCache | None = None,
    fingerprint: str | None = None,
    cache_settings: dict[str, Any] | None = None,
    corpus_chunk: int = 16384,
    precision: str = "float32",
    rescore: int | None = None,
) -> TaskResult:
    """Rank the whole corpus for every query that has a relevant document and score the rankings.

    The instruction goes on queries only (documents are encoded as they are); None means the model's default.
    `precision` ranks compressed vectors instead (llm2emb.retrieval.precision; int8/uint8 calibrated on this corpus's
    embeddings), `rescore` re-ranks binary candidates with the float query.
    """
    check_precision(precision)
    if rescore is not None and (rescore < 1 or precision not in ("binary", "ubinary")):
        raise UserError(f"rescore {rescore}: a positive factor, for the binary precisions only")
    encoder = as_encoder(model, batch_size)
    start = time.perf_counter()
    if fingerprint is None and cache is not None:
        from llm2emb.evaluate.cache import model_fingerprint

        fingerprint = model_fingerprint(encoder)
    corpus, cached = encode_corpus(encoder, data, cache, fingerprint, cache_settings)
    counted = set(evaluated_queries(data.qrels))
    query_ids = [q for q in data.query_ids if q in counted]
    texts = [t for q, t in zip(data.query_ids, data.queries) if q in counted]
    with locate_texts(lambda i: f"{data.name}: query {query_ids[i]}"):
        queries = normalized(encoder.encode_queries(texts, instruction=query_instruction))
    depth = max(int(m.partition("@")[2]) for m in metrics)
    if precision == "float32":
        indices, _ = top_k(queries, corpus, depth, corpus_chunk=corpus_chunk)
    else:
        ranges = calibration_ranges(corpus) if needs_ranges(precision) else None
        codes = quantize(corpus, precision, ranges)
        indices, _ = search_codes(queries, codes, precision, depth, ranges, rescore=rescore, corpus_chunk=corpus_chunk)
    ranking = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, indices)}
    return TaskResult(
        task=f"{data.name}/{data.split}",
        kind="retrieval",
        main_score=metrics[0],
        scores=retrieval_scores(ranking, data.qrels, metrics),
        examples=len(query_ids),
        documents=len(data.documents),
        seconds=time.perf_counter() - start,
        corpus_cached=cached if cache is not None else None,
        extra={"query_instruction": query_instruction, "precision": precision, "rescore": rescore,
               "bytes_per_vector": bytes_per_vector(precision, corpus.shape[1]),
               "warning": degenerate_warning(corpus, f"{data.name} corpus")},
    )
