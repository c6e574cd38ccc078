"""What evaluation needs from a model, and an adapter so sentence-transformers models fit too.

The evaluators call three methods: `encode(texts)` for symmetric tasks (STS), `encode_queries(texts,
instruction=...)` and `encode_documents(texts)` for retrieval. `Embedder` has them; a `SentenceTransformer` has
`encode_query` / `encode_document` instead, which `as_encoder` bridges, so one evaluation code path serves both and
the comparison table compares models, not harnesses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray: ...

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None) -> np.ndarray: ...

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray: ...


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _BatchSized:
    """Forwards to a TextEncoder, passing `batch_size` to the methods that take it."""

    def __init__(self, inner: Any, batch_size: int):
        self.inner, self.batch_size = inner, batch_size
        self.fingerprint = lambda: _fingerprint_of(inner)

    def _kw(self, fn: Any) -> dict[str, Any]:
        return {"batch_size": self.batch_size} if _accepts(fn, "batch_size") else {}

    def encode(self, texts, **kwargs):
        return self.inner.encode(list(texts), **self._kw(self.inner.encode), **kwargs)

    def encode_queries(self, texts, instruction=None):
        return self.inner.encode_queries(list(texts), instruction=instruction, **self._kw(self.inner.encode_queries))

    def encode_documents(self, texts):
        return self.inner.encode_documents(list(texts), **self._kw(self.inner.encode_documents))


class SentenceTransformerEncoder:
    """A `SentenceTransformer` seen as a TextEncoder; an explicit instruction becomes its prompt (a prefix)."""

    def __init__(self, model: Any, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size

    def fingerprint(self) -> str | None:
        return _fingerprint_of(self.model)

    def _run(self, method: str, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        return getattr(self.model, method)(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False, **kwargs
        )

    def encode(self, texts, instruction=None):
        return self._run("encode", texts, **({"prompt": instruction} if instruction is not None else {}))

    def encode_queries(self, texts, instruction=None):
        if instruction is not None:
            return self._run("encode", texts, prompt=instruction)
        return self._run("encode_query", texts)

    def encode_documents(self, texts):
        return self._run("encode_document", texts)


def _fingerprint_of(model: Any) -> str | None:
    from llm2emb.evaluate.cache import model_fingerprint

    return model_fingerprint(model)


def as_encoder(model: Any, batch_size: int | None = None) -> TextEncoder:
    """Wrap `model` so the evaluators can call it; raises TypeError when it has no usable encode methods."""
    if hasattr(model, "encode_query") and hasattr(model, "encode_document") and not hasattr(model, "encode_queries"):
        return SentenceTransformerEncoder(model, batch_size or 32)
    if isinstance(model, TextEncoder):
        return _BatchSized(model, batch_size) if batch_size else model
    raise TypeError(f"{type(model).__name__} has no encode / encode_queries / encode_documents methods")


def normalized(vectors: Any) -> np.ndarray:
    """float32 rows of unit length (zero rows stay zero), so a dot product is the cosine similarity."""
    vectors = np.asarray(vectors.detach().cpu() if hasattr(vectors, "detach") else vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
