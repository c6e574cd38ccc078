"""A frozen teacher embedder for distillation: its own model and tokenizer, each text embedded once per run.

The teacher reads the raw texts (not the student's token ids), so any sentence-transformers folder or llm2emb
model can teach any student. A text's vector is computed without gradient the first time a batch holds it and kept
in memory (on the CPU, float32) for later epochs and stages; under several processes each process caches the texts
of its own batches and the loss gathers the vectors with the batch (llm2emb.train.losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llm2emb.errors import UserError


class Teacher:
    """Cached, L2-normalised teacher vectors of queries (optionally with their instructions) and documents."""

    def __init__(self, model: Any, batch_size: int = 64, instructions: bool = False, name: str = "teacher"):
        from llm2emb.evaluate.encoders import as_encoder

        self.model = model
        self.encoder = as_encoder(model, batch_size)
        self.instructions = instructions
        self.name = name
        self.cache: dict[tuple[str, str | None, str], np.ndarray] = {}
        self.embedded = 0
        """Texts the teacher has run on so far (each distinct (kind, instruction, text) once)."""

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    def vectors(self, texts: Sequence[str], kind: str, instructions: Sequence[str | None] | None = None) -> torch.Tensor:
        """float32 (len(texts), teacher dim) on the CPU; `kind` is query or document (instructions: queries only)."""
        if kind not in ("query", "document"):
            raise ValueError(f"kind must be query or document, got {kind!r}")
        given = instructions if (self.instructions and kind == "query" and instructions is not None) else None
        keys = [(kind, given[i] if given else None, text) for i, text in enumerate(texts)]
        missing: dict[str | None, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key not in self.cache:
                missing.setdefault(key[1], []).append(key[2])
        for instruction, batch in missing.items():
            for text, vector in zip(batch, self._embed(batch, kind, instruction)):
                self.cache[(kind, instruction, text)] = vector
            self.embedded += len(batch)
        return torch.from_numpy(np.stack([self.cache[key] for key in keys]))

    @torch.no_grad()
    def _embed(self, texts: list[str], kind: str, instruction: str | None) -> np.ndarray:
        from llm2emb.evaluate.encoders import normalized

        if kind == "document":
            vectors = self.encoder.encode_documents(texts)
        else:
            vectors = self.encoder.encode_queries(texts, instruction=instruction)
        vectors = normalized(vectors)
        if not np.isfinite(vectors).all() or (np.linalg.norm(vectors, axis=1) == 0).any():
            raise UserError(f"{self.name}: the teacher gave a zero or non-finite vector; it cannot teach these texts")
        return vectors


def load_teacher(model: str, name: str, torch_dtype: Any = None, max_length: int | None = None,
                 batch_size: int = 64, instructions: bool = False) -> Teacher:
    """The teacher named `model` (sentence-transformers folder, llm2emb folder or base, asset alias), frozen."""
    from llm2emb.assets import resolve_asset
    from llm2emb.evaluate.runner import load_model

    path = resolve_asset(model)
    try:
        loaded = load_model(path, max_length=max_length, torch_dtype=torch_dtype)
    except (OSError, ValueError, UserError) as exc:  # UserError: already says what is wrong with the folder
        raise UserError(f"{name}: {model} could not be loaded as an embedder ({str(exc).splitlines()[0]})") from None
    loaded.eval()
    for parameter in loaded.parameters():
        parameter.requires_grad_(False)
    return Teacher(loaded, batch_size=batch_size, instructions=instructions, name=f"{name} ({model})")
