"""`llm2emb convert`: a base decoder becomes a self-contained bidirectional model folder (docs/ARCHITECTURE.md,
"The model folder")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm2emb.errors import UserError
from llm2emb.files import refuse_non_empty
from llm2emb.model.card import write_card
from llm2emb.model.embedder import Embedder

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(
    base: str,
    out: str | Path,
    pooling: str | dict[str, Any] = "mean",
    attention: str = "bidirectional",
    dtype: str = "auto",
    max_length: int = 512,
    query_instruction: str | None = None,
    query_template: str | None = None,
    overwrite: bool = False,
    rope_scaling: str | dict[str, Any] | None = None,
    causal_sink: bool | None = None,
    text_template: str | None = None,
) -> Embedder:
    """Load `base`, make it bidirectional (verified), attach the pooler and write the folder.

    The folder's config.json carries `is_causal: false`, so plain `AutoModel.from_pretrained` reloads it
    bidirectional too, and PEFT adapters trained on top load onto it unchanged. `rope_scaling` (llm2emb.model.rope) is
    written into config.json too, so other tools load the extended window the same way. `causal_sink` (on by default
    for bidirectional attention, llm2emb.model.attention) is llm2emb's own: plain transformers attends to every token from
    the first one too, so such a folder's vectors come from llm2emb (or its exports) only. `text_template` (chat |
    turn | bos | none | a template with {text}, llm2emb.model.prompts) wraps every text the folder embeds.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    refuse_non_empty(out, overwrite)
    embedder = Embedder.from_pretrained(base, pooling=pooling, attention=attention, torch_dtype=DTYPES[dtype],
                                        rope_scaling=rope_scaling, causal_sink=causal_sink,
                                        text_template=text_template)
    embedder.config.max_length = max_length
    embedder.config.default_query_instruction = query_instruction
    if query_template is not None:
        embedder.config.query_template = query_template
    embedder.save_pretrained(out, overwrite=overwrite)
    write_card(out, embedder.folder_config())
    return embedder
