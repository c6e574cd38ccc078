"""Helpers shared by the training tests."""

from __future__ import annotations

import pytest
import torch


def gradients_of_one_step(trainer) -> dict[str, torch.Tensor]:
    """The parameter gradients of one `training_step` on the trainer's first batch (in train mode)."""
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.model.modules())  # deterministic
    trainer.training_step(trainer.model, batch)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture
def step_gradients():
    return gradients_of_one_step
