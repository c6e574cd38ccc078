"""How far apart a model's vectors of different texts are: the one measure behind the training collapse guard
(llm2emb.train.collapse) and the warning `encode` and `eval` print for a degenerate model.

A collapsed embedder maps every text to nearly the same vector: the mean cosine between different texts goes to 1
(0.987-0.999 in the collapsed SmolLM2 run of issue 29), where an untrained SmolLM2-135M with mean pooling sits at
0.68 (bidirectional) and 0.84 (causal) on SNLI sentences, and trained embedders lower.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEGENERATE_COSINE = 0.98
"""Mean cosine between different texts at or above which `encode` and `eval` warn that the vectors are degenerate."""
SAMPLE_ROWS = 512
"""Rows a warning check looks at: the mean over 512 rows is within about 0.01 of the whole matrix's."""


def mean_cosine(vectors: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine over every pair of rows that are different texts (different `ids`; every pair without ids).

    NaN for fewer than two different texts. Computed in float32 without gradient: it watches, it does not train."""
    with torch.no_grad():
        unit = F.normalize(vectors.detach().float(), dim=-1)
        gram = unit @ unit.T
        if ids is None:
            different = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
        else:
            different = ids[:, None] != ids[None, :]
        pairs = different.sum()
        if pairs == 0:
            return torch.tensor(float("nan"), device=unit.device)
        return gram[different].sum() / pairs


def degenerate_warning(vectors: np.ndarray, what: str) -> str | None:
    """One warning line when the rows of `vectors` (a sample of up to SAMPLE_ROWS, spread over the matrix) are
    nearly one vector; None otherwise."""
    if len(vectors) < 2:
        return None
    rows = np.unique(np.linspace(0, len(vectors) - 1, min(len(vectors), SAMPLE_ROWS)).astype(int))
    cosine = float(mean_cosine(torch.from_numpy(np.asarray(vectors[rows], dtype=np.float32))))
    if not cosine >= DEGENERATE_COSINE:
        return None
    return (f"WARNING: {what}: the vectors are degenerate: mean cosine {cosine:.3f} between different texts "
            f"({len(rows)} rows sampled; {DEGENERATE_COSINE} or more means nearly one vector for every text); "
            "the model may have collapsed in training")
