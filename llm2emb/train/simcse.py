"""Unsupervised SimCSE: each text is its own positive and the two views differ only by dropout.

Queries and documents are embedded in separate forward passes, so attention dropout (`simcse_dropout`, set for the
stage by `AttentionDropout`) plus LoRA dropout make the two views differ. The loss is InfoNCE with in-batch
negatives on (text, text) rows, so the stage runs through `ContrastiveTrainer`, GradCache included.
"""

from __future__ import annotations

from transformers import TrainerCallback


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
