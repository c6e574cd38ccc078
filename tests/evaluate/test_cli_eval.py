"""`llm2emb eval` end to end on a tiny decoder: STS and a BEIR folder in, a table and JSON out; bad input exits 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.evaluate.metrics import ndcg_at_k, spearman

PAIRS = [
    (4.8, "A man is playing a guitar.", "A man plays the guitar."),
    (0.2, "A woman is slicing an onion.", "The cat sat on the mat."),
    (3.1, "The cat sat on the mat.", "A cat is sitting on a mat."),
    (1.0, "Proteins fold into structures.", "A man is playing a guitar."),
    (2.5, "Enzymes catalyse reactions.", "Proteins fold into structures."),
]
CORPUS = [("d1", "Music", "A man is playing a guitar on the street."), ("d2", "", "A woman is slicing an onion."),
          ("d3", "Biology", "Proteins fold into three-dimensional structures."), ("d4", "", "The cat sat on the mat.")]
QUERIES = [("q1", "who plays the guitar?"), ("q2", "what do proteins do?"), ("q3", "cats"), ("q4", "unjudged")]
QRELS = [("q1", "d1", 1), ("q2", "d3", 2), ("q2", "d2", 1), ("q3", "d4", 1), ("q4", "d2", 0)]


@pytest.fixture
def task_files(tmp_path, write_beir):
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{s}\t{a}\t{b}\n" for s, a, b in PAIRS))
    return sts, write_beir(tmp_path / "tiny-beir", CORPUS, QUERIES, QRELS)


def test_eval_cli_matches_scores_computed_by_hand(tiny_qwen2, task_files, tmp_path, capsys):
    sts, beir = task_files
    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_qwen2), "--pooling", "mean", "--sts", str(sts), "--beir", str(beir),
                 "--query-instruction", "Find the passage", "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(out)])
    assert code == 0
    screen = capsys.readouterr().out
    assert "spearman" in screen and "tiny-beir/test" in screen and "ndcg@10" in screen
    report = json.loads(out.read_text())
    assert report["settings"]["pooling"] == {"type": "mean"} and report["environment"]["versions"]["torch"]
    sts_result, retrieval = report["results"]
    assert retrieval["examples"] == 3 and retrieval["documents"] == 4  # q4 has no relevant document

    # The same numbers computed without the evaluation package's encoders, search or loaders.
    model = Embedder.from_pretrained(tiny_qwen2, pooling="mean")
    a = model.encode([p[1] for p in PAIRS])
    b = model.encode([p[2] for p in PAIRS])
    assert sts_result["scores"]["spearman"] == pytest.approx(spearman((a * b).sum(1), [p[0] for p in PAIRS]),
                                                             abs=1e-4)
    docs = model.encode_documents([(title + " " + text).strip() for _, title, text in CORPUS])
    queries = model.encode_queries([text for _, text in QUERIES[:3]], instruction="Find the passage")
    judged = {"q1": {"d1": 1}, "q2": {"d3": 2, "d2": 1}, "q3": {"d4": 1}}
    ranked = [[CORPUS[i][0] for i in np.argsort(-row, kind="stable")] for row in queries @ docs.T]
    expected = 100 * np.mean([ndcg_at_k(r, judged[q], 10) for r, q in zip(ranked, ["q1", "q2", "q3"])])
    assert retrieval["scores"]["ndcg@10"] == pytest.approx(expected, abs=1e-4)

    # A second run reads the corpus from the cache and reports the same scores.
    assert main(["eval", str(tiny_qwen2), "--pooling", "mean", "--beir", str(beir), "--query-instruction",
                 "Find the passage", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    again = json.loads(out.read_text())["results"][0]
    assert again["corpus_cached"] is True and again["scores"] == retrieval["scores"]


def test_eval_dtype_loads_the_model_in_it(tiny_qwen2, task_files, tmp_path):
    _, beir = task_files
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    assert main(["eval", str(tiny_qwen2), "--pooling", "mean", "--beir", str(beir), "--dtype", "bfloat16",
                 "--cache-dir", str(cache), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["dtype"] == "bfloat16"
    [cached] = [np.load(path) for path in cache.rglob("*.npy")]  # the corpus vectors this evaluation encoded
    documents = [(title + " " + text).strip() for _, title, text in CORPUS]
    in_bf16 = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype="bfloat16").encode_documents(documents)
    in_fp32 = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype="float32").encode_documents(documents)
    np.testing.assert_allclose(cached, in_bf16, atol=1e-6)
    assert np.abs(cached - in_fp32).max() > 1e-4


def test_eval_missing_file_is_one_line_exit_2(tiny_qwen2, tmp_path):
    result = subprocess.run([sys.executable, "-m", "llm2emb.cli", "eval", str(tiny_qwen2), "--pooling", "mean",
                             "--sts", str(tmp_path / "missing.tsv")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"llm2emb eval: error: {tmp_path / 'missing.tsv'}: STS file not found"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to evaluate"),
        (["--beir", "{tmp}/nope"], "BEIR folder not found"),
        (["--beir", "{beir}", "--split", "dev"], "qrels/dev.tsv: qrels file not found"),
        (["--sts", "{tmp}/bad.tsv"], "bad.tsv:1: expected a header"),
        (["--sts", "{sts}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--beir", "{beir}", "--corpus-sample", "1"], "smaller than the 4 relevant documents"),
    ],
)
def test_eval_bad_input(tiny_qwen2, task_files, tmp_path, capsys, args, message):
    sts, beir = task_files
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    args = [a.format(tmp=tmp_path, beir=beir, sts=sts) for a in args]
    assert main(["eval", str(tiny_qwen2), "--pooling", "mean", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm2emb eval: error: ") and message in err[0], err


def test_long_tasks_run_at_each_length_with_nDCG_at_1(tiny_qwen2, tmp_path, capsys):
    haystack = tmp_path / "prose.txt"
    haystack.write_text("Rivers carry silt to the sea. Deltas form where they slow.\nStars burn hydrogen.\n")
    out = tmp_path / "long.json"
    code = main(["eval", str(tiny_qwen2), "--pooling", "mean", "--long", "passkey", "needle", "--lengths", "40", "90",
                 "--long-documents", "4", "--haystack", str(haystack), "--rope-scaling", "ntk:2", "--no-cache",
                 "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [r["task"] for r in results] == ["passkey@40/test", "passkey@90/test", "needle@40/test", "needle@90/test"]
    assert all(r["main_score"] == "ndcg@1" and 0 <= r["scores"]["ndcg@1"] <= 100 for r in results)
    assert all(r["scores"]["ndcg@10"] >= r["scores"]["ndcg@1"] for r in results)
    assert "passkey@90" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--long", "needle"], "give --haystack FILE"),
    (["--long", "passkey", "--lengths", "500", "--max-length", "100"], "--max-length 100 would cut the 500-token"),
])
def test_long_task_mistakes_are_one_line(tiny_qwen2, capsys, extra, message):
    assert main(["eval", str(tiny_qwen2), "--pooling", "mean", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
