"""Evaluation: STS (Spearman of cosine) and BEIR retrieval (nDCG@10, Recall@100, MRR@10), all x100."""

from llm2emb.evaluate.cache import EmbeddingCache, model_fingerprint
from llm2emb.evaluate.data import BeirData, StsData, load_beir, load_sts
from llm2emb.evaluate.encoders import as_encoder
from llm2emb.evaluate.results import TaskResult, format_table, write_json
from llm2emb.evaluate.retrieval import evaluate_retrieval
from llm2emb.evaluate.sts import evaluate_sts

__all__ = [
    "BeirData",
    "EmbeddingCache",
    "StsData",
    "TaskResult",
    "as_encoder",
    "evaluate_retrieval",
    "evaluate_sts",
    "format_table",
    "load_beir",
    "load_sts",
    "model_fingerprint",
    "write_json",
]
