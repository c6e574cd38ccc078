"""Each pooler on hand-made hidden states: masks honoured, shapes, gradients, registry."""

import pytest
import torch

from llm2emb.errors import UserError
from llm2emb.pooling import POOLERS, build_pooler, pooler_spec

HIDDEN, LAYERS = 32, 3
SPECS = {
    "mean": "mean",
    "last_token": "last_token",
    "weighted_mean": "weighted_mean",
    "latent_attention": {"type": "latent_attention", "num_latents": 8, "num_heads": 4},
    "multi_layer": {"type": "multi_layer", "num_latents": 4, "num_heads": 4},
}


def make(name):
    torch.manual_seed(0)
    pooler = build_pooler(SPECS[name], HIDDEN, LAYERS)
    with torch.no_grad():
        for parameter in pooler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return pooler


def inputs(batch=2, length=7):
    torch.manual_seed(1)
    layers = tuple(torch.randn(batch, length, HIDDEN) for _ in range(LAYERS))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, :2] = 0  # instruction tokens
    mask[1, -2:] = 0  # padding
    return layers, mask


def test_every_registered_pooler_is_tested():
    assert set(POOLERS) == set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_masked_tokens_cannot_change_the_vector(name):
    pooler = make(name)
    layers, mask = inputs()
    before = pooler(layers[-1], mask, layers)
    changed = tuple(h.masked_fill(~mask.bool().unsqueeze(-1), 1e3) for h in layers)
    after = pooler(changed[-1], mask, changed)
    assert before.shape == (2, pooler.output_dim)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # ...while changing a pooled token does change it
    moved = tuple(h.clone() for h in layers)
    for h in moved:
        h[:, 4] += 1.0
    assert (pooler(moved[-1], mask, moved) - before).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["latent_attention", "multi_layer"])
def test_gradients_reach_trainable_pooler_and_weights_are_savable(name):
    pooler = make(name)
    assert pooler.trainable
    layers, mask = inputs()
    pooler(layers[-1], mask, layers).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pooler.parameters())
    rebuilt = build_pooler(pooler_spec(pooler), HIDDEN, LAYERS)
    rebuilt.load_state_dict(pooler.state_dict())
    torch.testing.assert_close(rebuilt(layers[-1], mask, layers), pooler(layers[-1], mask, layers))


@pytest.mark.parametrize("name", ["latent_attention", "multi_layer"])
def test_untrained_trainable_poolers_start_as_mean_pooling(name):
    pooler = build_pooler(SPECS[name], HIDDEN, LAYERS)
    mean = build_pooler("mean", HIDDEN, LAYERS)
    layers, mask = inputs()
    torch.testing.assert_close(pooler(layers[-1], mask, layers), mean(layers[-1], mask, layers))


def test_last_token_reads_the_last_pooled_position_with_left_padding():
    pooler = build_pooler("last_token", HIDDEN, LAYERS)
    hidden = torch.randn(1, 5, HIDDEN)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    torch.testing.assert_close(pooler(hidden, mask), hidden[:, 4])
    torch.testing.assert_close(pooler(hidden, torch.tensor([[1, 1, 1, 0, 0]])), hidden[:, 2])


def test_weighted_mean_weights_by_position_among_pooled_tokens():
    pooler = build_pooler("weighted_mean", HIDDEN, LAYERS)
    hidden = torch.randn(1, 4, HIDDEN)
    mask = torch.tensor([[0, 1, 1, 0]])
    expected = (hidden[:, 1] * 1 + hidden[:, 2] * 2) / 3
    torch.testing.assert_close(pooler(hidden, mask), expected)


def test_bad_pooling_settings_are_refused():
    with pytest.raises(UserError, match="not divisible by num_heads"):
        build_pooler({"type": "latent_attention", "num_heads": 5}, HIDDEN, LAYERS)
    with pytest.raises(UserError, match="unexpected keyword"):
        build_pooler({"type": "mean", "num_heads": 5}, HIDDEN, LAYERS)
