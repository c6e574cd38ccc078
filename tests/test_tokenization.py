"""The truncation rule: `max_length` bounds the whole prompt and only the text is cut; a text left no token (or an
empty one) is refused with its index, and no zero or NaN vector ever leaves `encode` or `forward`."""

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.tokenization import UnembeddableText

INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"
TEXT = "A man is playing a guitar on the street. " * 6


@pytest.fixture(scope="module", params=["mean", "last_token"])
def embedder(request, tiny_qwen2):
    return Embedder.from_pretrained(tiny_qwen2, pooling=request.param, torch_dtype=torch.float32)


def untruncated(embedder, text, instruction):
    return embedder.tokenize([text], instruction, max_length=10_000)


def test_a_long_prompt_keeps_its_instruction_and_loses_text_from_the_end(embedder):
    full = untruncated(embedder, TEXT, INSTRUCTION)
    prompt = full["attention_mask"].sum().item() - full["pool_mask"].sum().item()
    cut = embedder.tokenize([TEXT], INSTRUCTION, max_length=prompt + 5)
    assert cut["input_ids"].shape[1] == prompt + 5  # max_length bounds the whole prompt
    eos = int(embedder.pooler.needs_eos)
    text_ids = full["input_ids"][0][full["pool_mask"][0].bool()].tolist()
    kept = cut["input_ids"][0][cut["pool_mask"][0].bool()].tolist()
    assert kept[: 5 - eos] == text_ids[: 5 - eos] and len(kept) == 5  # the text's first tokens (and EOS) are pooled
    assert cut["input_ids"][0, :prompt - eos].tolist() == full["input_ids"][0, :prompt - eos].tolist()  # prompt whole
    if eos:
        assert cut["input_ids"][0, -1] == embedder.tokenizer.eos_token_id


def test_a_prompt_that_leaves_the_text_no_token_is_refused_with_its_counts(embedder):
    full = untruncated(embedder, "short", INSTRUCTION)
    prompt = full["attention_mask"].sum().item() - full["pool_mask"].sum().item() + int(embedder.pooler.needs_eos)
    embedder.tokenize(["short"], INSTRUCTION, max_length=prompt + 1)  # one token of room is enough
    with pytest.raises(UnembeddableText) as caught:
        embedder.tokenize(["fine text", "short"], [None, INSTRUCTION], max_length=prompt)
    assert caught.value.index == 1
    assert f"takes {prompt} tokens of max_length {prompt}, leaving the text none" in str(caught.value)
    # measured with a one-character text: a separator token that a real word absorbs may count once more
    assert prompt <= embedder.prompt_tokenizer.prompt_tokens(INSTRUCTION) <= prompt + 1


def test_encode_refuses_instead_of_returning_a_zero_vector(embedder):
    instruction = " ".join(["instruction"] * 600)  # the case: on main this gave a vector of norm 0
    with pytest.raises(UnembeddableText, match=r"^text 0: the prompt around the text .* of max_length 512,"):
        embedder.encode(["a", "b"], instruction=instruction)


def test_empty_text_is_refused_with_its_index(embedder):
    vectors = embedder.encode(["a cat", "a dog"])
    assert np.all(np.linalg.norm(vectors, axis=1) > 0.99)
    with pytest.raises(UnembeddableText, match=r"^text 1: the text is empty"):
        embedder.encode(["a cat", "", "a dog"])


def test_forward_refuses_a_row_with_an_empty_pool_mask(embedder):
    batch = embedder.tokenize(["a cat", "a dog"])
    batch["pool_mask"][1] = 0
    with pytest.raises(UnembeddableText, match=r"^text 1: no token of the text"):
        embedder(batch)


def test_encode_refuses_a_non_finite_vector(tiny_qwen2):
    broken = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32)
    with torch.no_grad():
        broken.backbone.norm.weight.fill_(float("nan"))
    with pytest.raises(UnembeddableText, match=r"^text 0: the model gave a vector of norm nan"):
        broken.encode(["a cat"])
    assert isinstance(UnembeddableText(0, "x"), UserError)
