"""`llm2emb.json`: what a model folder is (docs/ARCHITECTURE.md, "The model folder"), so any folder reloads into
the same Embedder."""

from __future__ import annotations

import functools
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
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{path}: unknown keys {unknown} (written by a newer llm2emb?)")
        from pydantic import ValidationError

        try:  # every value of the type its field declares (strict: no 1 for true, no "3" for 3)
            _file_schema().model_validate(raw)
            config = cls(**raw)
        except ValidationError as exc:
            problem = exc.errors()[0]
            key = ".".join(str(part) for part in problem["loc"])
            raise UserError(f"{path}: {key}: {problem['msg']} (got {problem.get('input')!r:.60})") from None
        if config.format_version > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {config.format_version} is newer than this llm2emb reads")
        return config


@functools.cache
def _file_schema():
    """A strict pydantic model of llm2emb.json's fields, to check the types a file holds before they are used."""
    import typing

    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(EmbedderConfig)
    return create_model("EmbedderConfigFile", __config__=ConfigDict(strict=True, extra="forbid"),
                        **{f.name: (hints[f.name], None) for f in fields(EmbedderConfig)})


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()
