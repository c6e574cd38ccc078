"""MNTP, LLM2Vec's masked next-token prediction: the adaptation objective that teaches a decoder to use both sides.

A fraction `mask_probability` of the tokens is masked as BERT does (80% the mask token, 10% a random token, 10%
unchanged; transformers' `DataCollatorForLanguageModeling`), and the bidirectional model predicts the original token
at position i from its hidden state at position i-1 through the base model's frozen LM head: the decoder keeps
predicting "the next token", as it was pretrained to, while learning to use the context on both sides. Decoder
tokenizers have no mask token; like LLM2Vec we use "_".
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorForLanguageModeling

from llm2emb.errors import UserError
from llm2emb.train.embedder_trainer import EmbedderTrainer
from llm2emb.train.errors import NonFiniteLossError

MASK_TOKEN = "_"
"""The mask token of MNTP when the tokenizer has none (LLM2Vec's choice for Llama and Mistral)."""



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

    from llm2emb.model.backbone import load_pretrained, resolve_base
    config = embedder.base_config
    embeddings = embedder.backbone.get_input_embeddings()
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=embeddings.weight.device,
                     dtype=embeddings.weight.dtype)
    if config.tie_word_embeddings:
        head.weight = embeddings.weight
        return head
    try:
        base = resolve_base(embedder.config.base)
        causal = load_pretrained(AutoModelForCausalLM, base, dtype=embeddings.weight.dtype)
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


class MNTPTrainer(EmbedderTrainer):
    """The Embedder's checkpoints and data order (EmbedderTrainer) with the MNTP loss and Trainer's training step."""

    def __init__(self, model, args, head: nn.Module, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.head = head.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = mntp_loss(model, self.head, inputs)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self.non_finite_message(loss.item()))
        return (loss, {}) if return_outputs else loss

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":
            return
        count = torch.as_tensor(int(inputs["attention_mask"].sum()), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()
