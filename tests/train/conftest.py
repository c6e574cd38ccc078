"""Helpers shared by the training tests."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp


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


def run_two_workers(worker, args: tuple, seconds: float = 300) -> None:
    """`worker(rank, *args)` in two spawned processes; the test fails (never hangs CI) if they outlast `seconds`."""
    workers = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the two workers did not finish in {seconds} s")


@pytest.fixture
def two_workers():
    return run_two_workers
