"""On-disk cache of corpus embeddings, keyed by what the model is and what the corpus holds.

Encoding a corpus is the slow half of retrieval evaluation; queries are few. The key combines a fingerprint of the
model (its weights, sampled, and its embedding settings) with a hash of the corpus content and the encode settings,
so a retrained model, an edited corpus or another pooling never reuses stale vectors, while re-running the same
evaluation (another split, another query instruction) skips the corpus entirely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from llm2emb.assets import cache_dir
from llm2emb.files import save_npy_atomic

_SAMPLES_PER_TENSOR = 4096


def default_cache_dir() -> Path:
    """`embeddings/` inside llm2emb's cache folder (LLM2EMB_CACHE, default ~/.cache/llm2emb)."""
    return cache_dir() / "embeddings"


def weights_fingerprint(module: Any) -> str:
    """Hash of every tensor's name, shape and dtype plus a strided sample of its values and its sum.

    Hashing all bytes of a 7B model takes longer than many evaluations; a strided sample plus the sum changes
    whenever training touches a tensor, which is what matters here.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::step].to(torch.float64).cpu().numpy()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(sample.tobytes())
            if flat.is_floating_point():
                digest.update(np.float64(flat.double().sum().item()).tobytes())
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str | None:
    """A stable identity for an encoder, or None when it cannot be derived (then nothing is cached).

    An object may supply its own with a `fingerprint()` method or attribute; torch modules (sentence-transformers
    models) and objects holding `backbone` and `pooler` modules (Embedder) are fingerprinted from their weights and
    settings.
    """
    own = getattr(model, "fingerprint", None)
    if own is not None:
        return str(own() if callable(own) else own)
    import torch

    parts = [type(model).__qualname__]
    modules = [getattr(model, name, None) for name in ("backbone", "pooler")]
    if isinstance(model, torch.nn.Module):
        modules = [model]
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    if not modules:
        return None
    parts += [weights_fingerprint(m) for m in modules]
    config = getattr(model, "config", None)
    if config is not None:
        parts.append(repr(config))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class EmbeddingCache:
    """A folder of `<key>.npy` files written atomically (a crash never leaves a half-written entry)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    @staticmethod
    def key(model_fingerprint: str, corpus_hash: str, **settings: Any) -> str:
        blob = json.dumps({"model": model_fingerprint, "corpus": corpus_hash, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str, rows: int) -> np.ndarray | None:
        """The cached matrix, or None when absent, unreadable or of the wrong length."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return array if array.ndim == 2 and len(array) == rows else None

    def put(self, key: str, array: np.ndarray) -> Path:
        return save_npy_atomic(self.path(key), array)
