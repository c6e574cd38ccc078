"""Shared fixtures: tiny random decoders and a byte-level BPE tokenizer trained in the test (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from llm2emb.model.backbone import VERIFIED_MODEL_TYPES

CORPUS = [
    "A man is playing a guitar on the street.",
    "A woman is slicing an onion in the kitchen.",
    "The cat sat on the mat and looked at the dog.",
    "Given a question, retrieve passages that answer it.",
    "Instruct: Query: what is the capital of France? Paris is the capital.",
    "Proteins fold into three-dimensional structures; enzymes catalyse reactions.",
    "0123456789 !?.,;:'\"()[]{}<>-_/\\@#$%^&*+=~`|",
] * 20

EVERY_POOLING = [
    "mean",
    "last_token",
    "weighted_mean",
    {"type": "latent_attention", "num_latents": 8, "num_heads": 4},
    {"type": "multi_layer", "num_latents": 4, "num_heads": 4},
]
"""Every pooler, the trainable ones sized for the tiny decoders."""

ARCHITECTURES = VERIFIED_MODEL_TYPES  # every verified type gets a tiny model and the per-architecture tests


def build_tokenizer(directory: Path | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a few hundred merges and an end-of-text token (docs/ARCHITECTURE.md, "Verified
    facts", says why)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def tiny_config(model_type: str, vocab_size: int = 400):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "mistral":
        return MistralConfig(sliding_window=8, **common)
    raise ValueError(model_type)


def save_tiny_model(directory: Path, model_type: str = "qwen2", seed: int = 0, vocab_size: int = 400) -> Path:
    """A random decoder of the given type, with its tokenizer, saved as a plain HF folder (causal, as on the hub)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(model_type, vocab_size))
    model.save_pretrained(directory)
    build_tokenizer(directory, vocab_size)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny base model per verified architecture."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny_model(root / name, name) for name in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models) -> Path:
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def tiny_st_teacher(tmp_path_factory) -> Path:
    """A real sentence-transformers folder (llama, mean pooling, normalised) whose tokenizer is not the tiny
    decoders': a teacher for distillation."""
    from sentence_transformers import SentenceTransformer, models

    root = tmp_path_factory.mktemp("teacher")
    base = save_tiny_model(root / "base", "llama", seed=7, vocab_size=300)
    transformer = models.Transformer(str(base), max_seq_length=64)
    transformer.tokenizer.pad_token = transformer.tokenizer.eos_token
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), "mean"), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "st"))
    return root / "st"


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
