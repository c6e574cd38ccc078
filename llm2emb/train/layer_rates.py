"""Layer-wise learning-rate decay: lower rates for the layers nearest the input, the top layer at the stage's rate.

A decoder turned bidirectional starts far from anything its pretraining saw, and at a rate high enough to move it in
a few dozen steps, the whole stack, embeddings included, moves at once; ULMFiT, ELECTRA and BEiT fine-tune with the
rate decayed layer by layer from the top so the lower layers, which hold the most general features, move least.
Layer depth d counts from the input: the token embeddings 0, decoder layer i at i + 1, and whatever sits on the
stack (final norm, pooler, heads) at L + 1; a parameter at depth d trains at rate x decay^(L + 1 - d).

Hand-written: Trainer builds two parameter groups (with and without weight decay) and no more; this splits each by
depth after it, so its optimizer and scheduler (LambdaLR scales every group's own rate) stay as they are.
"""

from __future__ import annotations

import re

import torch

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def depth(name: str, layers: int) -> int:
    """Depth of the parameter `name` (a module path of a decoder, plain or wrapped by PEFT) in a stack of `layers`."""
    found = LAYER.search(name)
    if found:
        return int(found.group(1)) + 1
    if "embed_tokens" in name:
        return 0
    return layers + 1


def split_by_depth(optimizer: torch.optim.Optimizer, model: torch.nn.Module, layers: int, decay: float) -> None:
    """Replace each of `optimizer`'s groups by one group per depth, its rate scaled by decay^(layers + 1 - depth)
    (before any step: the optimizer holds no state yet)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = list(optimizer.param_groups)
    optimizer.param_groups.clear()
    for group in groups:
        by_depth: dict[int, list] = {}
        for parameter in group["params"]:
            by_depth.setdefault(depth(names.get(id(parameter), ""), layers), []).append(parameter)
        for level, params in sorted(by_depth.items()):
            optimizer.add_param_group({**group, "params": params, "lr": group["lr"] * decay ** (layers + 1 - level)})
