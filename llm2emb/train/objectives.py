"""A stage's objective: its data and its Trainer.

A stage says `objective: contrastive | mntp | simcse`. Contrastive stages read rows (train/data.py) and train with
`ContrastiveTrainer` (train/trainer.py, losses from train/contrastive.py); LLM2Vec's two adaptation objectives read
raw text, a `.txt` file (one text per line) or the `text` column of any dataset format (`columns: {text: sentence}`
renames it): MNTP (train/mntp.py) and unsupervised SimCSE (train/simcse.py, a contrastive stage on (text, text)
rows with attention dropout).

LLM2Vec merges the MNTP adapter into the weights and starts a fresh one for the next stage; here every stage keeps
training the same adapter (one adapter to save and load).
"""

from __future__ import annotations

from typing import Any

import datasets

from llm2emb.errors import UserError
from llm2emb.readers import BadRow
from llm2emb.train.collapse import CollapseGuard
from llm2emb.train.data import (
    ContrastiveCollator,
    LoadedDataset,
    StageData,
    build_stage_data,
    records,
    row_features,
)
from llm2emb.train.mntp import MNTPCollator, MNTPTrainer, lm_head
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.recipe_file import format_key_path
from llm2emb.train.simcse import AttentionDropout
from llm2emb.train.trainer import ContrastiveTrainer

# ---- raw text ------------------------------------------------------------------------------------------------


def read_texts(spec: DatasetSpec, on_bad_rows: str = "fail", key: str = "dataset") -> list[str]:
    """The texts of a dataset: lines of a .txt file, or the `text` column (renamed by `columns`) of any other."""
    texts: list[str] = []
    skipped = 0
    if spec.format == "text":
        with open(spec.path, encoding="utf-8") as handle:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    else:
        column = spec.columns.get("text", "text")
        for where, record in records(spec):
            value = None if isinstance(record, BadRow) else record.get(column)
            if not isinstance(value, str) or not value.strip():
                problem = record if isinstance(record, BadRow) else f"{where}: field {column!r} must be a non-empty string"
                if on_bad_rows == "fail":
                    raise UserError(f"{problem} (set on_bad_rows: skip to skip such rows)")
                skipped += 1
                continue
            texts.append(value)
    if spec.max_rows is not None:
        texts = texts[: spec.max_rows]
    if not texts:
        raise UserError(f"{key}: {spec.path}: no texts")
    return texts


def text_rows(spec: DatasetSpec, on_bad_rows: str, key: str) -> LoadedDataset:
    """Raw texts as training rows (query = positive = the text), the shape StageData and SimCSE need."""
    texts = read_texts(spec, on_bad_rows, key)
    rows = datasets.Dataset.from_dict(
        {"query": texts, "positive": texts, "negatives": [[] for _ in texts], "instruction": [None] * len(texts),
         "positive_span": [[] for _ in texts]},
        features=row_features(),
    )
    return LoadedDataset(rows, spec)


def build_objective_data(stage: StageSpec, index: int, on_bad_rows: str, seed: int, world_size: int = 1) -> StageData:
    """A stage's data: contrastive rows, or raw texts for mntp/simcse (one dataset per batch, mixed by weight)."""
    if stage.objective == "contrastive":
        return build_stage_data(stage, index, on_bad_rows, seed, world_size)
    parts = []
    for position, spec in enumerate(stage.datasets):
        key = format_key_path(("stages", index, "datasets", position))
        part = text_rows(spec, on_bad_rows, key)
        if len(part.rows) < stage.batch_size:
            raise UserError(f"{key}: {len(part.rows)} texts, fewer than stages[{index}].batch_size ({stage.batch_size})")
        parts.append(part)
    if stage.batch_size % world_size:
        raise UserError(f"stages[{index}].batch_size: {stage.batch_size} must be a multiple of the {world_size} processes")
    return StageData(parts, stage.batch_size, 0, seed)


# ---- the trainer of a stage ------------------------------------------------------------------------------------


def build_trainer(stage: StageSpec, index: int, embedder, args, data: StageData, max_length: int) -> Any:
    """The Trainer of one stage for its objective (the runner adds callbacks and runs it)."""
    from llm2emb.train.contrastive import trainer_options

    if embedder.token_head is not None:  # trained only by a late-interaction stage (frozen, it is no unused DDP param)
        embedder.token_head.requires_grad_(stage.late_interaction is not None)
    if stage.objective == "mntp":
        return MNTPTrainer(embedder, args, head=lm_head(embedder), train_dataset=data,
                           data_collator=MNTPCollator(embedder, stage.mask_probability, max_length))
    options = trainer_options(stage, embedder, index)
    collator = ContrastiveCollator(embedder, max_length=max_length, keep_texts=options["teacher"] is not None)
    guard = stage.collapse_guard
    trainer = ContrastiveTrainer(
        model=embedder, args=args, train_dataset=data, data_collator=collator,
        gradcache_chunk=stage.gradcache_chunk, bidirectional_warmup=stage.bidirectional_warmup,
        collapse_guard=guard is not None and CollapseGuard(
            patience=guard.patience, cosine=guard.cosine, loss_ratio=guard.loss_ratio,
            cosine_alone=guard.cosine_alone, regression=guard.regression, after_step=stage.warmup_step_count),
        layer_lr_decay=stage.layer_lr_decay, **options,
    )
    if stage.objective == "simcse":
        trainer.add_callback(AttentionDropout(embedder, stage.simcse_dropout))
    return trainer
