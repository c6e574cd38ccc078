"""`llm2emb.json`: what a model folder is (docs/ARCHITECTURE.md, "The model folder"), so any folder reloads into
the same Embedder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.files import write_text_atomic

CONFIG_NAME = "llm2emb.json"
POOLING_WEIGHTS_NAME = "pooling.safetensors"
FORMAT_VERSION = 1
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild an Embedder besides the weights themselves."""

    base: str | None = None
    """Where the backbone came from (hub id, folder or .gguf). For adapter folders, the adapter's base."""
    backbone: str = "weights"
    """`weights`: full backbone weights in this folder; `adapter`: a PEFT adapter here on top of `base`."""
    attention: str = "bidirectional"
    pooling: dict[str, Any] = field(default_factory=lambda: {"type": "mean"})
    normalize: bool = True
    max_length: int = 512
    padding_side: str = "right"
    query_template: str = DEFAULT_QUERY_TEMPLATE
    document_template: str = "{text}"
    default_query_instruction: str | None = None
    default_document_instruction: str | None = None
    matryoshka_dims: list[int] | None = None
    rope_scaling: dict[str, Any] | None = None
    """{"method": pi | ntk | yarn, "factor": s}: RoPE stretched for texts beyond the trained window (llm2emb.rope)."""
    token_dim: int | None = None
    """Width of the trained late-interaction head (token_head.safetensors, llm2emb.late_interaction); None: none,
    token vectors are the hidden states as they are."""
    format_version: int = FORMAT_VERSION

    def save(self, directory: Path) -> None:
        write_text_atomic(Path(directory) / CONFIG_NAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> EmbedderConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{path}: unknown keys {unknown} (written by a newer llm2emb?)")
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {raw['format_version']} is newer than this llm2emb reads")
        return cls(**raw)


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()
