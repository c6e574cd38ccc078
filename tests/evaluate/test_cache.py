"""Corpus embeddings are cached by model and corpus content: hits skip encoding, any change misses."""

import numpy as np
import torch

from llm2emb.evaluate.cache import EmbeddingCache, model_fingerprint
from llm2emb.evaluate.data import load_beir
from llm2emb.evaluate.retrieval import encode_corpus, evaluate_retrieval

CORPUS = [("d1", "Paris", "Paris is the capital of France."), ("d2", "", "Cats sleep most of the day."),
          ("d3", "Proteins", "Enzymes catalyse chemical reactions.")]
QUERIES = [("q1", "capital of France"), ("q2", "how long do cats sleep"), ("q3", "unjudged query")]
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 0)]


def test_hit_skips_the_corpus_and_changes_miss(tmp_path, trigram_encoder, write_beir):
    make = trigram_encoder
    data = load_beir(write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS))
    cache = EmbeddingCache(tmp_path / "cache")
    first = make()
    cold = evaluate_retrieval(first, data, cache=cache)
    assert cold.corpus_cached is False and first.calls["documents"] == 3
    assert first.calls["queries"] == 2  # q3 has no relevant document, so it is not even encoded

    again = make()
    warm = evaluate_retrieval(again, data, cache=cache, query_instruction="Find the passage")
    assert warm.corpus_cached is True and again.calls["documents"] == 0
    assert again.instructions == ["Find the passage"]
    assert warm.scores == cold.scores

    other_model = make(salt="retrained")
    assert evaluate_retrieval(other_model, data, cache=cache).corpus_cached is False
    assert other_model.calls["documents"] == 3

    edited = load_beir(write_beir(tmp_path / "beir2", [*CORPUS[:2], ("d3", "Proteins", "Edited.")], QUERIES, QRELS))
    assert edited.corpus_hash != data.corpus_hash
    assert evaluate_retrieval(make(), edited, cache=cache).corpus_cached is False

    # Settings that change the vectors (max length, dimension) are part of the key.
    assert evaluate_retrieval(make(), data, cache=cache, cache_settings={"max_length": 8}).corpus_cached is False
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_a_stopped_corpus_encode_resumes_at_its_first_unfinished_block(tmp_path, trigram_encoder, write_beir):
    corpus = [(f"d{i}", "", f"document number {i} about topic {i % 3}") for i in range(7)]
    data = load_beir(write_beir(tmp_path / "beir", corpus, QUERIES[:1], [("q1", "d1", 1)]))
    cache = EmbeddingCache(tmp_path / "cache")

    class StopsAtThirdBlock(trigram_encoder):
        def encode_documents(self, texts):
            if self.calls["documents"] >= 4:  # blocks of 2: the first two went through
                raise KeyboardInterrupt
            return super().encode_documents(texts)

    stopped = StopsAtThirdBlock()
    try:
        encode_corpus(stopped, data, cache, stopped.fingerprint(), block=2)
    except KeyboardInterrupt:
        pass
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the two finished blocks

    resumed = trigram_encoder()
    vectors, cached = encode_corpus(resumed, data, cache, resumed.fingerprint(), block=2)
    assert resumed.calls["documents"] == 3 and cached is False  # d4-d6 only
    whole, _ = encode_corpus(trigram_encoder(), data)
    np.testing.assert_allclose(vectors, whole, rtol=1e-6)
    # once whole, the matrix is one entry and the blocks are gone; the next run encodes nothing
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    again = trigram_encoder()
    assert encode_corpus(again, data, cache, again.fingerprint(), block=2)[1] is True
    assert again.calls["documents"] == 0


def test_corrupt_or_stale_entry_is_a_miss(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = EmbeddingCache.key("model", "corpus")
    cache.path(key).write_bytes(b"not a numpy file")
    assert cache.get(key, rows=3) is None
    cache.put(key, np.ones((2, 4)))
    assert cache.get(key, rows=3) is None  # wrong number of rows: never served
    assert cache.get(key, rows=2).dtype == np.float32
    assert not list(tmp_path.glob("*.tmp"))


def test_weight_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    module = torch.nn.Linear(300, 300)
    before = model_fingerprint(module)
    assert model_fingerprint(module) == before
    with torch.no_grad():
        module.weight[123, 45] += 1e-3  # a single changed weight, likely outside the strided sample
    assert model_fingerprint(module) != before
    assert model_fingerprint(object()) is None
