"""STS evaluation: Spearman correlation between the cosine similarity of the two embeddings and the gold score."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llm2emb.evaluate.data import StsData
from llm2emb.evaluate.encoders import as_encoder, normalized
from llm2emb.evaluate.metrics import spearman
from llm2emb.evaluate.results import TaskResult
from llm2emb.model.spread import degenerate_warning
from llm2emb.model.tokenization import locate_texts


def evaluate_sts(model: Any, data: StsData, instruction: str | None = None, batch_size: int | None = None) -> TaskResult:
    """Encode each distinct sentence once and score the pairs.

    STS is symmetric: both sides get the same treatment, plain text unless `instruction` is given (E5-style
    models put it on both sentences).
    """
    encoder = as_encoder(model, batch_size)
    start = time.perf_counter()
    unique = list(dict.fromkeys(data.sentences1 + data.sentences2))
    position = {text: i for i, text in enumerate(unique)}
    with locate_texts(lambda i: f"{data.name}: sentence {unique[i]!r:.80}"):
        vectors = normalized(encoder.encode(unique, instruction=instruction) if instruction else encoder.encode(unique))
    a = vectors[[position[t] for t in data.sentences1]]
    b = vectors[[position[t] for t in data.sentences2]]
    cosine = np.einsum("ij,ij->i", a, b)
    return TaskResult(
        task=data.name,
        kind="sts",
        main_score="spearman",
        scores={"spearman": spearman(cosine, data.scores)},
        examples=len(data.scores),
        seconds=time.perf_counter() - start,
        extra={"instruction": instruction, "warning": degenerate_warning(vectors, f"{data.name} sentences")},
    )
