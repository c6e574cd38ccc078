"""Multi-vector retrieval through MUVERA's fixed-dimensional encodings (Dhulipala et al., 2024).

Late interaction scores a query's token vectors Q against a document's P by Chamfer similarity,
sum over q in Q of max over p in P of <q, p>: precise, but every document keeps one vector per token and search cannot
use a single-vector index. MUVERA maps each set to one vector, its FDE, whose inner product approximates Chamfer:

  1. SimHash: k_sim Gaussian directions cut space into B = 2^k_sim buckets (a vector's bucket: its sign bits).
  2. In each bucket, the query FDE sums its vectors; the document FDE averages its vectors, and an empty bucket
     takes the document vector whose bucket is nearest in Hamming distance (so every query vector meets one).
  3. Each bucket's block is projected to d_proj dimensions by a random +-1 matrix / sqrt(d_proj) (identity when
     d_proj is the input dimension); blocks are concatenated, and the whole is repeated r_reps times with fresh
     randomness (the repetitions are concatenated too: their inner products add up).

So <FDE(Q), FDE(P)> / r_reps approximates Chamfer(Q, P): for unit vectors, the paper's Theorem 2.1 bounds
|<FDE(Q), FDE(P)> / |Q| - NChamfer(Q, P)| by eps with probability 1 - delta for k_sim = O(log(m / delta) / eps) and
d_proj = O(log(m / (eps delta)) / eps^2). A single-vector search over FDEs gives candidates that exact Chamfer then
re-ranks (`search_fde`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm2emb.errors import UserError


@dataclass(frozen=True)
class FdeConfig:
    dim: int
    """Dimension of the token vectors."""
    k_sim: int = 4
    d_proj: int | None = None
    """Per-bucket projection; None keeps dim (no projection)."""
    r_reps: int = 10
    seed: int = 0

    @property
    def size(self) -> int:
        """Components of one FDE: r_reps x 2^k_sim x d_proj."""
        return self.r_reps * (2 ** self.k_sim) * (self.d_proj or self.dim)


class Muvera:
    """FDEs of token-vector sets under one drawn set of SimHash directions and projections (`FdeConfig.seed`)."""

    def __init__(self, config: FdeConfig):
        if config.k_sim < 0 or config.r_reps < 1 or (config.d_proj is not None and config.d_proj < 1):
            raise UserError(f"MUVERA: k_sim >= 0, r_reps >= 1 and d_proj >= 1 are needed, got {config}")
        self.config = config
        rng = np.random.default_rng(config.seed)
        d_proj = config.d_proj or config.dim
        self.directions = rng.standard_normal((config.r_reps, config.dim, config.k_sim)).astype(np.float32)
        if config.d_proj is None:
            self.projections = None
        else:
            signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(config.r_reps, config.dim, d_proj))
            self.projections = signs / np.sqrt(d_proj)
        self.buckets = 2 ** config.k_sim
        codes = np.arange(self.buckets)
        bits = (codes[:, None] >> np.arange(config.k_sim)) & 1
        self.hamming = (bits[:, None, :] != bits[None, :, :]).sum(-1)  # bucket x bucket

    def _buckets(self, vectors: np.ndarray, rep: int) -> np.ndarray:
        bits = (vectors @ self.directions[rep]) > 0
        return (bits * (1 << np.arange(self.config.k_sim))).sum(axis=1)

    def _project(self, blocks: np.ndarray, rep: int) -> np.ndarray:
        return blocks if self.projections is None else blocks @ self.projections[rep]

    def query(self, vectors: np.ndarray) -> np.ndarray:
        """The query FDE: per bucket, the sum of the query's vectors in it."""
        vectors = self._check(vectors)
        parts = []
        for rep in range(self.config.r_reps):
            blocks = np.zeros((self.buckets, self.config.dim), np.float32)
            np.add.at(blocks, self._buckets(vectors, rep), vectors)
            parts.append(self._project(blocks, rep).ravel())
        return np.concatenate(parts)

    def document(self, vectors: np.ndarray) -> np.ndarray:
        """The document FDE: per bucket, the mean of the document's vectors in it; an empty bucket takes the vector
        whose bucket is nearest in Hamming distance."""
        vectors = self._check(vectors)
        parts = []
        for rep in range(self.config.r_reps):
            owner = self._buckets(vectors, rep)
            sums = np.zeros((self.buckets, self.config.dim), np.float32)
            np.add.at(sums, owner, vectors)
            counts = np.bincount(owner, minlength=self.buckets)
            blocks = sums / np.maximum(counts, 1)[:, None]
            for empty in np.flatnonzero(counts == 0):
                blocks[empty] = vectors[np.argmin(self.hamming[empty, owner])]
            parts.append(self._project(blocks, rep).ravel())
        return np.concatenate(parts)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.config.dim or not len(vectors):
            raise UserError(f"MUVERA: expected a non-empty (n, {self.config.dim}) set of vectors, got {vectors.shape}")
        return vectors


def chamfer(query: np.ndarray, document: np.ndarray) -> float:
    """Chamfer similarity: for each query vector its best document vector's inner product, summed."""
    return float((np.asarray(query, np.float32) @ np.asarray(document, np.float32).T).max(axis=1).sum())


def search_fde(
    muvera: Muvera,
    queries: list[np.ndarray],
    documents: list[np.ndarray],
    k: int = 10,
    candidates: int = 100,
    document_fdes: np.ndarray | None = None,
) -> np.ndarray:
    """Top-k document indices per query: `candidates` by FDE inner product, re-ranked by exact Chamfer."""
    if document_fdes is None:
        document_fdes = np.stack([muvera.document(d) for d in documents])
    width = min(candidates, len(documents))
    ranked = np.empty((len(queries), min(k, width)), np.int64)
    for row, query in enumerate(queries):
        scores = document_fdes @ muvera.query(query)
        picks = np.sort(np.argpartition(-scores, width - 1)[:width])  # corpus order: ties break alike
        scores = np.array([chamfer(query, documents[i]) for i in picks])
        ranked[row] = picks[np.argsort(-scores, kind="stable")[: ranked.shape[1]]]
    return ranked
