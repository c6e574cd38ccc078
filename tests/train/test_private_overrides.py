"""The private transformers APIs llm2emb overrides or reads still exist with the signatures it expects.

pyproject admits any transformers 5.x; if an upgrade renamed `Trainer._save_checkpoint`, the override would be
silently skipped (checkpoints would no longer be model folders renamed into place) instead of failing. This test is
that failure. (issue 32: public callbacks cannot stage a checkpoint or count a batch's tokens, so these stay.)
"""

from __future__ import annotations

import inspect

import pytest
from transformers import PretrainedConfig, Trainer

from llm2emb.train.embedder_trainer import EmbedderTrainer
from llm2emb.train.mntp import MNTPTrainer
from llm2emb.train.trainer import ContrastiveTrainer

OVERRIDES = [
    (EmbedderTrainer, "_save"),
    (EmbedderTrainer, "_save_checkpoint"),
    (EmbedderTrainer, "_get_output_dir"),
    (EmbedderTrainer, "_load_from_checkpoint"),
    (ContrastiveTrainer, "_track_num_input_tokens"),
    (MNTPTrainer, "_track_num_input_tokens"),
]


@pytest.mark.parametrize(("cls", "name"), OVERRIDES, ids=lambda x: getattr(x, "__name__", x))
def test_each_override_replaces_a_trainer_method_of_the_same_signature(cls, name):
    assert hasattr(Trainer, name), f"transformers' Trainer has no {name} any more: {cls.__name__}'s override is dead"
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    ours = list(inspect.signature(getattr(cls, name)).parameters)
    assert ours == theirs, f"Trainer.{name}{theirs} != {cls.__name__}.{name}{ours}"


def test_the_attention_implementation_is_still_read_from_the_config():
    config = PretrainedConfig()
    assert hasattr(config, "_attn_implementation")  # read by model.py and attention.py
