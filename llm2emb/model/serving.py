"""The files a serving engine reads from an exported sentence-transformers folder, written in the layout it parses.

sentence-transformers 6 saves its modules under new names (`sentence_transformers.sentence_transformer.modules.
pooling.Pooling`), the pooling mode as one string (`pooling_mode: mean`), and no `max_seq_length` in
`sentence_bert_config.json`. The engines read the older layout (docs/SERVING.md gives the code each rule comes from):

- vLLM takes a folder's pooling from `modules.json` only for the module type `sentence_transformers.models.Pooling`
  (normalisation for `sentence_transformers.models.Normalize`), reading the `pooling_mode_*` flags that are true in
  its `config.json`, and the attention from `config.json`'s `is_causal`;
- TEI parses `1_Pooling/config.json` for `pooling_mode_cls_token` and `pooling_mode_mean_tokens` (required before
  its releases that read the string form) and `pooling_mode_lasttoken`, `sentence_bert_config.json` for
  `max_seq_length` (required), and `use_bidirectional_attention` (not `is_causal`) from `config.json` for Llama,
  Mistral, Qwen2 and Qwen3.

sentence-transformers 6 still loads the older names and keys into the same modules (tests/test_export.py compares
the vectors), so the export writes them, and both attention keys: one folder that every one of them reads alike.
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_POOLING = {"mean": "mean", "last_token": "lasttoken"}
"""llm2emb pooling -> the sentence-transformers Pooling mode with the same vectors: what the engines can serve."""

CLASSIC_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}
"""A sentence-transformers module class -> the module type name every engine and every sentence-transformers
release since 2 recognises."""

POOLING_FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
MODE_FLAG = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "mean_sqrt_len_tokens":
             "mean_sqrt_len_tokens", "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}
"""sentence-transformers 6's `pooling_mode` string -> its older `pooling_mode_<flag>` key."""


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value) -> None:
    """Plain writes: the folder is an export's staging copy, renamed into place whole once it is complete."""
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_engine_layout(folder: Path, max_length: int) -> None:
    """Rewrite a saved sentence-transformers folder's Transformer, Pooling and Normalize entries, pooling config and
    sentence_bert_config.json into the older layout, and spell bidirectional attention both ways in config.json.
    A module of another type (llm2emb's own pooling) keeps its entry: no engine serves it."""
    modules = read_json(folder / "modules.json")
    for module in modules:
        name = module["type"].rsplit(".", 1)[-1]
        if name not in CLASSIC_TYPES:
            continue
        module["type"] = CLASSIC_TYPES[name]
        if name == "Pooling":
            pooling_file = folder / module["path"] / "config.json"
            pooling = read_json(pooling_file)
            mode = pooling["pooling_mode"]
            write_json(pooling_file, {
                "word_embedding_dimension": pooling["embedding_dimension"],
                **{f"pooling_mode_{flag}": flag == MODE_FLAG[mode] for flag in POOLING_FLAGS},
                "include_prompt": pooling.get("include_prompt", True),
            })
    write_json(folder / "modules.json", modules)
    sentence_bert = folder / "sentence_bert_config.json"
    settings = read_json(sentence_bert) if sentence_bert.is_file() else {}
    write_json(sentence_bert, {"max_seq_length": max_length, "do_lower_case": False, **settings})
    config = read_json(folder / "config.json")
    if config.get("is_causal") is False:
        write_json(folder / "config.json", {**config, "use_bidirectional_attention": True})
