"""Situated chunks: chunkers, window placement, and chunk vectors equal to the pooled span of the context forward."""

import numpy as np
import pytest
import torch

from llm2emb import Embedder, UserError
from llm2emb.retrieval.chunking import (
    chunk_windows,
    chunker_from_spec,
    place_windows,
    sentence_spans,
    word_spans,
)

DOCUMENT = ("Aspirin inhibits cyclooxygenase. It lowers fever in adults! Does it thin the blood? "
            "Yes, at low doses it does.\n\nA second paragraph follows here")


def texts_of(text, spans):
    return [text[a:b] for a, b in spans]


def test_sentence_and_word_chunkers():
    assert texts_of(DOCUMENT, sentence_spans(DOCUMENT)) == [
        "Aspirin inhibits cyclooxygenase.", "It lowers fever in adults!", "Does it thin the blood?",
        "Yes, at low doses it does.", "A second paragraph follows here"]
    assert texts_of('He said "stop." Then left.', sentence_spans('He said "stop." Then left.')) == [
        'He said "stop."', "Then left."]
    assert sentence_spans("   ") == []
    glued = "It binds the receptor.A second finding follows.Doses of 3.5 mg agree."
    assert texts_of(glued, sentence_spans(glued)) == [
        "It binds the receptor.", "A second finding follows.", "Doses of 3.5 mg agree."]
    abbreviated = "Smith et al. (2019) saw it, e.g. in mice (Fig. 2) vs. rats. It held, i.e. always. so did this."
    # no sentence ends at an abbreviation's stop, nor before a lower-case word
    assert texts_of(abbreviated, sentence_spans(abbreviated)) == [
        "Smith et al. (2019) saw it, e.g. in mice (Fig. 2) vs. rats.", "It held, i.e. always. so did this."]
    assert texts_of("a b  c d e", word_spans("a b  c d e", 2)) == ["a b", "c d", "e"]
    assert chunker_from_spec("words:2")("a b c") == [(0, 3), (4, 5)]
    for bad in ("words:0", "words:x", "paragraphs"):
        with pytest.raises(UserError, match="expected 'sentences' or 'words:N'"):
            chunker_from_spec(bad)


def test_windows_hold_their_chunks_with_context_on_both_sides():
    assert place_windows(10, [(0, 3), (3, 10)], budget=10) == [(0, [0, 1])]
    chunks = [(i, i + 3) for i in range(0, 60, 3)]
    windows = place_windows(60, chunks, budget=16)
    placed = {member: start for start, members in windows for member in members}
    assert sorted(placed) == list(range(len(chunks)))
    for member, start in placed.items():
        begin, end = chunks[member]
        assert 0 <= start <= 60 - 16 and start <= begin and end <= start + 16  # whole, inside the text
        if 8 <= begin and end <= 52:  # away from the text's ends, a chunk keeps context on both sides
            assert min(begin - start, start + 16 - end) >= 3
    # a chunk longer than the budget keeps its first tokens; one no stride window holds whole gets its own
    assert place_windows(40, [(5, 30)], budget=10) == [(5, [0])]
    assert place_windows(40, [(3, 11)], budget=10) == [(2, [0])]  # stride windows start at 0 and 5


@pytest.fixture(scope="module")
def embedder(tiny_qwen2):
    return Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32)


def test_a_chunk_vector_is_the_mean_of_its_tokens_in_the_whole_document_forward(embedder):
    spans = sentence_spans(DOCUMENT)
    [result] = embedder.encode_chunks([DOCUMENT])
    assert result.spans == spans and result.vectors.shape == (len(spans), embedder.dim)
    # by hand: one forward over the whole document, mean of each sentence's token states, normalised
    located = embedder.prompt_tokenizer.locate_text(DOCUMENT, kind="document")
    with torch.no_grad():
        states = embedder.backbone(input_ids=torch.tensor([located.ids])).last_hidden_state[0]
    shift = located.text_start  # offsets count from the prompt's start: the text template goes first
    for row, (start, end) in enumerate(spans):
        tokens = [i for i in range(located.first, located.last + 1)
                  if located.offsets[i][1] > start + shift and located.offsets[i][0] < end + shift]
        expected = torch.nn.functional.normalize(states[tokens].mean(dim=0), dim=-1).numpy()
        np.testing.assert_allclose(result.vectors[row], expected, atol=1e-5)
    # the context matters: a sentence alone, or with another document around it, embeds differently
    alone = embedder.encode_documents([DOCUMENT[slice(*spans[1])]])[0]
    assert np.abs(alone - result.vectors[1]).max() > 1e-3
    other = "Penguins cannot fly. " + DOCUMENT[slice(*spans[1])] + " Ice is cold."
    [moved] = embedder.encode_chunks([other])
    assert np.abs(moved.vectors[1] - result.vectors[1]).max() > 1e-3


@pytest.mark.parametrize("pooling", ["last_token", {"type": "latent_attention", "num_latents": 4, "num_heads": 2}])
def test_every_pooler_pools_only_the_chunk_from_one_forward(tiny_qwen2, pooling):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling=pooling, torch_dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in embedder.pooler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    [result] = embedder.encode_chunks([DOCUMENT], instruction="Represent the passage", kind="query")
    [piece] = chunk_windows(embedder.prompt_tokenizer, DOCUMENT, result.spans, "Represent the passage", "query")
    for member, pool in zip(piece.chunks, piece.pools):  # one row per chunk: the plain forward, no pool_rows
        batch = {"input_ids": torch.tensor([piece.ids]), "attention_mask": torch.ones(1, len(piece.ids), dtype=torch.long),
                 "pool_mask": torch.tensor([pool])}
        with torch.no_grad():
            expected = torch.nn.functional.normalize(embedder.forward(batch), dim=-1)[0].numpy()
        np.testing.assert_allclose(result.vectors[member], expected, atol=1e-5)


def test_batches_and_padding_sides_do_not_change_the_vectors(embedder):
    documents = [DOCUMENT, "One short line.", "Two lines here. And another one that runs a little longer."]
    reference = [c.vectors for c in embedder.encode_chunks(documents, batch_size=1)]
    for side in ("left", "right"):
        embedder.config.padding_side = side
        try:
            for got, want in zip(embedder.encode_chunks(documents, batch_size=3), reference):
                np.testing.assert_allclose(got.vectors, want, atol=1e-5)
        finally:
            embedder.config.padding_side = "right"


def test_long_documents_run_in_windows_that_keep_the_prompt_and_each_chunk(embedder):
    long = " ".join(f"Sentence number {i} says something new." for i in range(30))
    spans = sentence_spans(long)
    windows = chunk_windows(embedder.prompt_tokenizer, long, spans, "Represent the passage", "query", window=96)
    assert len(windows) > 2 and sorted(m for w in windows for m in w.chunks) == list(range(len(spans)))
    tokenizer = embedder.tokenizer
    prefix = embedder.prompt_tokenizer.locate_text(long, "Represent the passage", "query")
    assert prefix.first > 3  # the query template puts the instruction before the text
    for piece in windows:
        assert len(piece.ids) <= 96
        assert piece.ids[:prefix.first] == prefix.ids[:prefix.first]  # the instruction is never cut
        for member, pool in zip(piece.chunks, piece.pools):
            pooled = tokenizer.decode([i for i, keep in zip(piece.ids, pool) if keep])
            assert pooled.strip() == long[slice(*spans[member])]
    [result] = embedder.encode_chunks([long], window=96, instruction="Represent the passage", kind="query")
    assert result.vectors.shape == (30, embedder.dim) and np.isfinite(result.vectors).all()
    norms = np.linalg.norm(result.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_bad_spans_and_windows_say_what_is_wrong(embedder):
    with pytest.raises(UserError, match=r"document 0: chunk 1: span \(5, 999\) is not inside the text"):
        embedder.encode_chunks(["Some text here."], spans=[[(0, 4), (5, 999)]])
    with pytest.raises(UserError, match=r"document 0: chunk 0: span \(4, 5\) holds only whitespace"):
        embedder.encode_chunks(["Some text here."], spans=[[(4, 5)]])
    with pytest.raises(UserError, match="2 span lists for 1 documents"):
        embedder.encode_chunks(["Some text."], spans=[[(0, 4)], [(0, 2)]])
    with pytest.raises(UserError, match="document 0: no chunk to embed"):
        embedder.encode_chunks(["   "])
    with pytest.raises(UserError, match="leaving the text none"):
        embedder.encode_chunks(["Some text."], instruction="a very long instruction " * 4, kind="query", window=8)
