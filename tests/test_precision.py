"""Compressed embeddings: codes by hand, against sentence-transformers, bit packing, search, encode and eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sentence_transformers.quantization import quantize_embeddings

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.evaluate.search import search_codes as search
from llm2emb.retrieval.precision import bytes_per_vector, calibration_ranges, dequantize, quantize


def test_int8_levels_by_hand():
    ranges = np.array([[0.0, -1.0], [1.0, 1.0]], np.float32)  # dim 0 spans [0, 1], dim 1 spans [-1, 1]
    vectors = np.array([[0.0, -1.0], [0.25, 0.1], [1.0, 1.0], [1.2, -3.0]], np.float32)
    codes = quantize(vectors, "uint8", ranges)
    # level = round((x - min) / ((max - min) / 255)), clipped to 0..255
    np.testing.assert_array_equal(codes, [[0, 0], [64, 140], [255, 255], [255, 0]])  # 63.75 and 140.25 rounded
    np.testing.assert_array_equal(quantize(vectors, "int8", ranges), codes.astype(np.int16) - 128)
    back = dequantize(codes, "uint8", ranges)
    np.testing.assert_allclose(back[:3], vectors[:3], atol=0.5 / 255 * 2 + 1e-6)  # within half a level
    with pytest.raises(UserError, match="needs calibration ranges"):
        quantize(vectors, "int8")
    with pytest.raises(UserError, match="do not fit embeddings of dim 3"):
        quantize(np.zeros((1, 3), np.float32), "int8", ranges)


def test_scalar_codes_are_sentence_transformers_within_one_level_and_closer_to_the_floats():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 32)).astype(np.float32)
    ranges = calibration_ranges(vectors)
    theirs = quantize_embeddings(vectors, "int8", ranges=ranges)
    ours = quantize(vectors, "int8", ranges)
    assert np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max() <= 1  # they truncate, we round
    ours_error = np.abs(dequantize(ours, "int8", ranges) - vectors).mean()
    theirs_error = np.abs(dequantize(theirs, "int8", ranges) - vectors).mean()
    assert ours_error < theirs_error
    np.testing.assert_array_equal(calibration_ranges(ranges), ranges)  # saved ranges calibrate to themselves


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_bits_pack_like_sentence_transformers_and_round_trip(precision):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(10, 12)).astype(np.float32)  # 12 dims: the second byte is half padding
    codes = quantize(vectors, precision)
    assert codes.shape == (10, 2) and bytes_per_vector(precision, 12) == 2
    np.testing.assert_array_equal(codes, quantize_embeddings(vectors, precision))
    np.testing.assert_array_equal(dequantize(codes, precision, dim=12), np.where(vectors > 0, 1.0, -1.0))


def test_binary_search_ranks_by_hamming_and_rescore_by_the_float_query():
    rng = np.random.default_rng(2)
    corpus, queries = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(3, 16)).astype(np.float32)
    codes = quantize(corpus, "ubinary")
    bits_c, bits_q = corpus > 0, queries > 0
    hamming = (bits_q[:, None, :] != bits_c[None, :, :]).sum(-1)
    indices, _ = search(queries, codes, "ubinary", 5)
    for q in range(3):  # best first, ties in corpus order
        np.testing.assert_array_equal(indices[q], np.lexsort((np.arange(50), hamming[q]))[:5])
    rescored, scores = search(queries, codes, "ubinary", 5, rescore=4)
    signs = np.where(bits_c, 1.0, -1.0)
    for q in range(3):
        candidates = np.lexsort((np.arange(50), hamming[q]))[:20]
        float_scores = signs[candidates] @ queries[q]
        np.testing.assert_array_equal(rescored[q], candidates[np.argsort(-float_scores, kind="stable")[:5]])
        np.testing.assert_allclose(scores[q], np.sort(float_scores)[::-1][:5], rtol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_qwen2):
    return Embedder.from_pretrained(tiny_qwen2, pooling="mean")


def test_encode_returns_codes(model):
    texts = ["a cat on a mat", "a dog in the street", "an enzyme in a cell"]
    floats = model.encode(texts)
    ranges = calibration_ranges(floats)
    np.testing.assert_array_equal(model.encode(texts, precision="int8", ranges=ranges),
                                  quantize(floats, "int8", ranges))
    assert model.encode(texts, precision="binary").shape == (3, 8)
    with pytest.raises(UserError, match="int8 needs calibration ranges"):
        model.encode(texts, precision="int8")


def test_cli_encode_writes_codes_and_their_ranges(tiny_qwen2, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("a cat on a mat\na dog in the street\nan enzyme in a cell\n")
    base = ["encode", str(tiny_qwen2), "--pooling", "mean", "--input", str(texts)]
    assert main([*base, "--output", str(tmp_path / "f.npy")]) == 0
    assert main([*base, "--output", str(tmp_path / "q.npy"), "--precision", "int8", "--calibration",
                 str(tmp_path / "f.npy")]) == 0
    floats, codes = np.load(tmp_path / "f.npy"), np.load(tmp_path / "q.npy")
    ranges = np.load(tmp_path / "q.npy.ranges.npy")
    np.testing.assert_array_equal(codes, quantize(floats, "int8", ranges))
    assert main([*base, "--output", str(tmp_path / "b.npy"), "--precision", "ubinary"]) == 0
    assert np.load(tmp_path / "b.npy").dtype == np.uint8 and np.load(tmp_path / "b.npy").shape == (3, 8)
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "x.npy"), "--precision", "uint8"]) == 2
    assert "uint8 needs calibration ranges" in capsys.readouterr().err


def test_eval_at_each_precision(model, tmp_path):
    from llm2emb.evaluate import load_beir
    from llm2emb.evaluate.retrieval import evaluate_retrieval

    (tmp_path / "qrels").mkdir()
    docs = [f"Document {i} about the {w}." for i, w in enumerate(["cat", "dog", "enzyme", "guitar", "onion"] * 4)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                   for i, t in enumerate(docs)))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"the {w}"}) + "\n"
                                                    for i, w in enumerate(["cat", "dog", "enzyme"])))
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n")
    data = load_beir(tmp_path)
    results = {p: evaluate_retrieval(model, data, precision=p, rescore=2 if p == "binary" else None)
               for p in ("float32", "float16", "int8", "binary")}
    assert results["float16"].main == pytest.approx(results["float32"].main, abs=1e-6)
    assert {p: r.extra["bytes_per_vector"] for p, r in results.items()} == {
        "float32": 256, "float16": 128, "int8": 64, "binary": 8}
    with pytest.raises(UserError, match="rescore 2: a positive factor, for the binary precisions only"):
        evaluate_retrieval(model, data, precision="int8", rescore=2)
