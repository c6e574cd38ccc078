"""The truncation rule: `max_length` bounds the whole prompt and only the text is cut; a text left no token (or an
empty one) is refused with its index, and no zero or NaN vector ever leaves `encode` or `forward`."""

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.model.tokenization import UnembeddableText

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


# ---- texts far longer than max_length are cut before tokenization ----------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llm2emb.model.tokenization import PromptTokenizer  # noqa: E402

PIECES = ["a", "man", " ", "  ", "plays", ".", ",", "\n", "é", "日本", "guitar", "-", "----", "x" * 40, "\t"]


def whole(monkeypatch, embedder, texts, instruction=None, max_length=None):
    """The prompts tokenized whole (the pre-tokenization cut switched off): the reference."""
    with monkeypatch.context() as patched:
        patched.setattr(PromptTokenizer, "cut_point", lambda self, text, limit: None)
        return list(embedder.prompt_tokenizer.rows(texts, instruction, max_length, "query"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=400), max_length=st.integers(4, 24))
def test_the_cut_before_tokenization_keeps_every_kept_token(embedder, monkeypatch, pieces, max_length):
    text = "".join(pieces)
    try:
        want = whole(monkeypatch, embedder, [text], INSTRUCTION[:20], max_length + 16)[0]
    except UnembeddableText:  # a text of whitespace only: refused either way
        with pytest.raises(UnembeddableText):
            next(embedder.prompt_tokenizer.rows([text], INSTRUCTION[:20], max_length + 16, "query"))
        return
    got = next(embedder.prompt_tokenizer.rows([text], INSTRUCTION[:20], max_length + 16, "query"))
    assert (got.ids, got.pool) == (want.ids, want.pool)
    assert (got.cut > 0) == (want.cut > 0) and got.cut <= want.cut


def test_texts_around_the_bound_give_the_same_tokens_and_vectors(embedder, monkeypatch):
    tokenizer = embedder.prompt_tokenizer
    limit = 24
    bound = (limit + 8) * tokenizer.longest_token
    texts = [("word " * (bound // 5 + 3))[:n] for n in (bound - 1, bound, bound + 1, bound + 5, 2 * bound + 40, 5 * bound)]
    texts += ["y" * (3 * bound), "z" * (bound - 3) + " tail " * 50]  # no whitespace at all; whitespace after the bound
    assert tokenizer.cut_point(texts[-3], limit) is not None  # these do get cut
    got = list(tokenizer.rows(texts, None, limit, "query"))
    want = whole(monkeypatch, embedder, texts, None, limit)
    assert [(g.ids, g.pool) for g in got] == [(w.ids, w.pool) for w in want]
    monkeypatch.setattr(embedder.config, "max_length", limit)
    vectors = embedder.encode(texts)
    with monkeypatch.context() as patched:
        patched.setattr(PromptTokenizer, "cut_point", lambda self, text, limit: None)
        np.testing.assert_array_equal(vectors, embedder.encode(texts))


def test_a_tokenizer_whose_cut_would_move_tokens_is_given_the_whole_text(embedder, monkeypatch):
    """The check behind the cut: when the tokens kept from the text cut at the bound and at twice the bound differ,
    the text is tokenized whole (simulated by a bound so small that tokens straddle it)."""
    tokenizer = embedder.prompt_tokenizer
    monkeypatch.setattr(PromptTokenizer, "longest_token", property(lambda self: 1))  # no token over one character
    text = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx " * 40
    assert tokenizer.bounded(text, None, 4, tokenizer.prompts.query) in (text, text[: tokenizer.cut_point(text, 4)])
    got = next(tokenizer.rows([text], None, 4, "query"))
    want = whole(monkeypatch, embedder, [text], None, 4)[0]
    assert (got.ids, got.pool) == (want.ids, want.pool)
