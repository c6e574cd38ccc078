"""GradCache gives the full-batch gradient of LoRA and pooler parameters (fp32, tiny bidirectional decoder)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer

from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.losses import InfoNCELoss

QUERIES = ["a man plays guitar", "the cat sat on the mat", "what is the capital of France?", "enzymes", "dog"]
DOCS = [
    "A man is playing a guitar on the street.",
    "The cat sat on the mat and looked at the dog.",
    "Paris is the capital.",
    "Proteins fold; enzymes catalyse reactions.",
    "The dog looked at the cat.",
]
NEGATIVES = [f"{d} {extra}" for d in DOCS for extra in ("no", "onion kitchen")]  # k = 2


class TinyEmbedder(nn.Module):
    """Bidirectional tiny decoder + LoRA + masked mean + a trainable linear pooler, like Embedder.forward."""

    def __init__(self, path, dropout: float):
        super().__init__()
        backbone = AutoModel.from_pretrained(path, attention_dropout=dropout)
        backbone.config.is_causal = False
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False,
        )  # B != 0 so lora_A gets a gradient too
        self.backbone = get_peft_model(backbone, lora)
        self.head = nn.Linear(backbone.config.hidden_size, 32)

    def forward(self, batch):
        hidden = self.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        mask = batch["pool_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def tokenize(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {**enc, "pool_mask": enc["attention_mask"].clone()}


@pytest.fixture(scope="module")
def setup(tiny_qwen2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    tokenizer.pad_token = tokenizer.eos_token
    batches = [tokenize(tokenizer, QUERIES), tokenize(tokenizer, DOCS + NEGATIVES)]
    query_ids = torch.arange(len(QUERIES))
    doc_ids = 100 + torch.arange(len(DOCS) + len(NEGATIVES))
    loss = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    return tiny_qwen2, batches, lambda embs: loss(embs[0], embs[1], query_ids, doc_ids), loss


def grads(model, loss_module):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + [
        ("tau", loss_module.temperature.log_temperature)
    ]
    out = {n: p.grad.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = None
    return out


def assert_relatively_close(got: dict, want: dict, tol: float = 1e-5):
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].abs().sum() > 0, f"{name} has no gradient, the comparison would be vacuous"
        error = (got[name] - want[name]).norm() / want[name].norm()
        assert error < tol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("chunk_size", [2, 3])
def test_gradcache_equals_full_batch(setup, chunk_size):
    path, batches, loss_fn, loss_module = setup
    torch.manual_seed(0)
    model = TinyEmbedder(path, dropout=0.0).eval()  # eval: dropout off, so one full pass is the reference
    full = loss_fn([model(b) for b in batches])
    full.backward()
    want = grads(model, loss_module)

    cached = gradcache_backward(model, batches, loss_fn, chunk_size=chunk_size)
    assert cached.item() == pytest.approx(full.item(), rel=1e-6)
    assert_relatively_close(grads(model, loss_module), want)
    assert any(p.grad is None for p in model.backbone.base_model.model.embed_tokens.parameters())


def test_dropout_is_replayed_identically(setup):
    """With dropout on, GradCache equals a chunked forward *with* graph drawing the same random numbers."""
    path, batches, loss_fn, loss_module = setup
    torch.manual_seed(0)
    model = TinyEmbedder(path, dropout=0.2).train()

    torch.manual_seed(123)
    from llm2emb.train.gradcache import chunks

    reference = loss_fn([torch.cat([model(c) for c in chunks(b, 2)]) for b in batches])
    reference.backward()
    want = grads(model, loss_module)

    torch.manual_seed(123)
    loss = gradcache_backward(model, batches, loss_fn, chunk_size=2)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert_relatively_close(grads(model, loss_module), want)
    after = torch.rand(1)
    torch.manual_seed(123)
    with torch.no_grad():
        for b in batches:
            for c in chunks(b, 2):
                model(c)
    assert torch.equal(after, torch.rand(1)), "the replay must not advance the random generator"


def test_plain_path_when_chunk_covers_batch(setup):
    path, batches, loss_fn, loss_module = setup
    torch.manual_seed(0)
    model = TinyEmbedder(path, dropout=0.0).eval()
    calls = []

    def embed(batch):
        calls.append(batch["input_ids"].shape[0])
        return model(batch)

    gradcache_backward(embed, batches, loss_fn, chunk_size=64)
    assert calls == [len(QUERIES), len(DOCS) + len(NEGATIVES)]


def test_loss_fn_error_leaves_gradients_untouched(setup):
    path, batches, _, _ = setup
    model = TinyEmbedder(path, dropout=0.0)

    def failing(embs):
        raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError):
        gradcache_backward(model, batches, failing, chunk_size=2)
    assert all(p.grad is None for p in model.parameters())


def test_a_chunk_of_short_rows_drops_the_padding_only_longer_rows_needed():
    from llm2emb.train.gradcache import chunks

    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(20).view(4, 5) * right, "attention_mask": right, "pool_mask": right.clone(),
             "labels": torch.arange(4), "name": "queries"}
    first, second = chunks(batch, 2)
    assert first["input_ids"].shape == (2, 5)
    assert torch.equal(second["attention_mask"], torch.tensor([[1, 0, 0], [1, 1, 1]]))
    assert torch.equal(second["input_ids"], batch["input_ids"][2:, :3])
    assert torch.equal(second["labels"], torch.tensor([2, 3])) and second["name"] == "queries"
    left = right.flip(dims=[1])
    _, second = chunks({"input_ids": left * 7, "attention_mask": left, "pool_mask": left}, 2)
    assert torch.equal(second["attention_mask"], torch.tensor([[0, 0, 1], [1, 1, 1]]))
