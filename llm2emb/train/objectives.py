"""The adaptation objectives of LLM2Vec that run before contrastive training: MNTP and unsupervised SimCSE.

A stage says `objective: contrastive | mntp | simcse`. The two adaptation objectives read raw text: a `.txt` file
(one text per line) or the `text` column of any dataset format (`columns: {text: sentence}` renames it).

- **MNTP** (masked next-token prediction): a fraction `mask_probability` of the tokens is masked as BERT does
  (80% the mask token, 10% a random token, 10% unchanged; transformers' `DataCollatorForLanguageModeling`), and the
  bidirectional model predicts the original token at position i from its hidden state at position i-1 through the
  base model's frozen LM head: the decoder keeps predicting "the next token", as it was pretrained to, while
  learning to use the context on both sides. Decoder tokenizers have no mask token; like LLM2Vec we use "_".
- **SimCSE** (unsupervised): each text is its own positive; the two views differ only by dropout (attention
  dropout `simcse_dropout` during the stage, plus LoRA dropout), because queries and documents are embedded in
  separate forward passes. It is InfoNCE with in-batch negatives on (text, text) rows, so it runs through the
  contrastive trainer, GradCache included.

LLM2Vec merges the MNTP adapter into the weights and starts a fresh one for the next stage; here every stage keeps
training the same adapter (one adapter to save and load).
"""

from __future__ import annotations

import copy
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback

from llm2emb.errors import UserError
from llm2emb.readers import BadRow
from llm2emb.train.data import ContrastiveCollator, LoadedDataset, StageData, build_stage_data, records
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.recipe_file import format_key_path
from llm2emb.train.trainer import ContrastiveTrainer

MASK_TOKEN = "_"
"""The mask token of MNTP when the tokenizer has none (LLM2Vec's choice for Llama and Mistral)."""


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
        {"query": texts, "positive": texts, "negatives": [[] for _ in texts], "instruction": [None] * len(texts)},
        features=datasets.Features({
            "query": datasets.Value("string"),
            "positive": datasets.Value("string"),
            "negatives": datasets.List(datasets.Value("string")),
            "instruction": datasets.Value("string"),
        }),
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


# ---- MNTP ------------------------------------------------------------------------------------------------------


class MNTPCollator:
    """Items of raw text -> {input_ids (masked), attention_mask, labels (-100 except at masked tokens)}."""

    def __init__(self, embedder, mask_probability: float = 0.2, max_length: int | None = None):
        tokenizer = copy.deepcopy(embedder.tokenizer)  # the model's own tokenizer keeps no mask token
        if tokenizer.mask_token is None:
            ids = tokenizer(MASK_TOKEN, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UserError(f"objective mntp: the tokenizer has no mask token and {MASK_TOKEN!r} is not one token")
            tokenizer.mask_token = tokenizer.convert_ids_to_tokens(ids[0])
        self.tokenizer = tokenizer
        self.max_length = max_length or embedder.config.max_length
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mask_probability)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([item["query"] for item in items], truncation=True, max_length=self.max_length,
                                 return_special_tokens_mask=True)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(items))]
        return dict(self.masker(rows))


def lm_head(embedder) -> nn.Module:
    """The base model's output projection, frozen: tied to the input embeddings, or loaded from the base."""
    from transformers import AutoModelForCausalLM

    from llm2emb.backbone import resolve_base
    config = embedder.base_config
    embeddings = embedder.backbone.get_input_embeddings()
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=embeddings.weight.device,
                     dtype=embeddings.weight.dtype)
    if config.tie_word_embeddings:
        head.weight = embeddings.weight
        return head
    try:
        base = resolve_base(embedder.config.base)
        causal = AutoModelForCausalLM.from_pretrained(base.path, dtype=embeddings.weight.dtype, **base.model_kwargs)
    except (OSError, ValueError, UserError) as exc:
        raise UserError(f"objective mntp needs the LM head of {embedder.config.base}: {str(exc).splitlines()[0]}") from None
    with torch.no_grad():
        head.weight.copy_(causal.get_output_embeddings().weight)
    return head.requires_grad_(False)


def mntp_loss(embedder, head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the original token at each masked position i, predicted from the hidden state at i-1."""
    attention_mask = batch["attention_mask"].to(embedder.device)
    hidden = embedder.backbone(
        input_ids=batch["input_ids"].to(embedder.device),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp_min(0),
    ).last_hidden_state
    labels = batch["labels"].to(embedder.device)[:, 1:]
    selected = labels != -100
    predictors = hidden[:, :-1][selected]
    if predictors.shape[0] == 0:  # nothing masked after position 0 in this batch
        return hidden.sum() * 0.0
    return F.cross_entropy(head(predictors).float(), labels[selected])


class MNTPTrainer(ContrastiveTrainer):
    """ContrastiveTrainer's checkpoints and data order, with the MNTP loss and Trainer's plain training step."""

    def __init__(self, model, args, head: nn.Module, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.head = head.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = mntp_loss(model, self.head, inputs)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(loss.item()))
        return (loss, {}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        return Trainer.training_step(self, model, inputs, num_items_in_batch)

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":
            return
        count = torch.as_tensor(int(inputs["attention_mask"].sum()), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()


# ---- SimCSE ---------------------------------------------------------------------------------------------------


class AttentionDropout(TrainerCallback):
    """Sets the attention dropout of every attention module for one stage and puts the old values back after."""

    def __init__(self, embedder, probability: float):
        self.embedder, self.probability, self.saved = embedder, probability, []

    def on_train_begin(self, args, state, control, **kwargs):
        modules = [m for m in self.embedder.backbone.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
        self.saved = [(m, m.attention_dropout) for m in modules]
        for module in modules:
            module.attention_dropout = self.probability

    def on_train_end(self, args, state, control, **kwargs):
        for module, value in self.saved:
            module.attention_dropout = value


# ---- the trainer of a stage ------------------------------------------------------------------------------------


def build_trainer(stage: StageSpec, index: int, embedder, args, data: StageData, max_length: int) -> Any:
    """The Trainer of one stage for its objective (the runner adds callbacks and runs it)."""
    from llm2emb.train.contrastive import trainer_options

    if stage.objective == "mntp":
        return MNTPTrainer(embedder, args, head=lm_head(embedder), train_dataset=data,
                           data_collator=MNTPCollator(embedder, stage.mask_probability, max_length))
    options = trainer_options(stage, embedder, index)
    collator = ContrastiveCollator(embedder, max_length=max_length, keep_texts=options["teacher"] is not None)
    trainer = ContrastiveTrainer(
        model=embedder, args=args, train_dataset=data, data_collator=collator,
        gradcache_chunk=stage.gradcache_chunk, bidirectional_warmup=stage.bidirectional_warmup, **options,
    )
    if stage.objective == "simcse":
        trainer.add_callback(AttentionDropout(embedder, stage.simcse_dropout))
    return trainer
