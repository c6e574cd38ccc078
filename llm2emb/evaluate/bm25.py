"""BM25, the lexical baseline of retrieval tables (through bm25s: a maintained, fast implementation)."""

from __future__ import annotations

from llm2emb.errors import UserError
from llm2emb.evaluate.data import BeirData
from llm2emb.evaluate.metrics import evaluated_queries


def bm25_ranking(data: BeirData, k: int = 100) -> dict[str, list[str]]:
    """The top-k document ids of every evaluated query under BM25 (Lucene's variant, English stopwords)."""
    try:
        import bm25s
    except ImportError:
        raise UserError("the BM25 baseline needs bm25s: pip install 'llm2emb[eval]'") from None
    counted = set(evaluated_queries(data.qrels))
    query_ids = [q for q in data.query_ids if q in counted]
    texts = [t for q, t in zip(data.query_ids, data.queries) if q in counted]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(data.documents, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    positions, _ = index.retrieve(tokens, k=min(k, len(data.documents)), show_progress=False)
    return {query: [data.doc_ids[i] for i in row] for query, row in zip(query_ids, positions)}
