"""`llm2emb.json`: what a model folder is (docs/ARCHITECTURE.md, "The model folder"), so any folder reloads into
the same Embedder."""

from __future__ import annotations

import functools
import hashlib
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
DIGESTED_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")
"""A model folder's small files whose every value can change the vectors (weights are checked structurally only,
llm2emb.files.damaged_file: hashing gigabytes on every load would cost more than it guards)."""

ADDED_LATER = {"text_template": "{text}"}
"""Fields added after the digest, with the value a folder without them means: left out of the digest at that value,
so folders written before them still verify."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild an Embedder besides the weights themselves."""

    base: str | None = None
    """Where the backbone came from (hub id, folder or .gguf). For adapter folders, the adapter's base."""
    backbone: str = "weights"
    """`weights`: full backbone weights in this folder; `adapter`: a PEFT adapter here on top of `base`."""
    attention: str = "bidirectional"
    causal_sink: bool = False
    """Bidirectional models only: every text's first token attends to itself alone, as in the causal base
    (llm2emb.model.attention, "The causal sink"). New conversions turn it on; folders written before it (2026-12-06) lack
    the key and attend plainly bidirectionally."""
    pooling: dict[str, Any] = field(default_factory=lambda: {"type": "mean"})
    normalize: bool = True
    max_length: int = 512
    padding_side: str = "right"
    query_template: str = DEFAULT_QUERY_TEMPLATE
    document_template: str = "{text}"
    text_template: str = "{text}"
    """Around every text, query or document, instruction or not (llm2emb.model.prompts): e.g. the base's chat template
    for its user turn. Folders written before it (2026-12-07) lack the key: the text alone."""
    default_query_instruction: str | None = None
    default_document_instruction: str | None = None
    matryoshka_dims: list[int] | None = None
    rope_scaling: dict[str, Any] | None = None
    """{"method": pi | ntk | yarn, "factor": s}: RoPE stretched for texts beyond the trained window (llm2emb.model.rope)."""
    token_dim: int | None = None
    """Width of the trained late-interaction head (token_head.safetensors, llm2emb.model.late_interaction); None: none,
    token vectors are the hidden states as they are."""
    format_version: int = FORMAT_VERSION
    file_digests: dict[str, str] | None = None
    """sha256 of the folder's small files that change the vectors (DIGESTED_FILES), written last by `save`; a folder
    whose file no longer matches is refused on load (a value edited into another valid one cannot be told from a
    deliberate change otherwise). None in folders written before 2026-12-06: not checked."""
    digest: str | None = None
    """sha256 of this file's other fields: an llm2emb.json edited or damaged into other valid values is refused."""

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.file_digests = {name: file_digest(directory / name) for name in DIGESTED_FILES
                             if (directory / name).is_file()}
        self.digest = self.own_digest()
        write_text_atomic(directory / CONFIG_NAME, json.dumps(asdict(self), indent=2) + "\n")

    def own_digest(self) -> str:
        fields_but_digest = {k: v for k, v in asdict(self).items()
                             if k != "digest" and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(fields_but_digest, sort_keys=True).encode()).hexdigest()

    def verify(self, directory: Path) -> None:
        """Refuse a folder whose llm2emb.json or digested files changed since `save` wrote them."""
        path = Path(directory) / CONFIG_NAME
        if self.digest is not None and self.digest != self.own_digest():
            raise UserError(f"{path}: its values were changed after llm2emb wrote it (the digest does not match): "
                            "re-convert or re-save the model, or restore the file")
        for name, digest in (self.file_digests or {}).items():
            target = Path(directory) / name
            if not target.is_file() or file_digest(target) != digest:
                raise UserError(f"{target}: {'missing' if not target.is_file() else 'changed'} since this model folder "
                                f"was written (llm2emb.json records its sha256): restore it, or re-convert the model")

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
        config.verify(directory)
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
