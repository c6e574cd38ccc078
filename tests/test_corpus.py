"""Streaming `llm2emb encode`: JSONL with ids and titles, chunks, resume after a kill, several processes, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.retrieval.corpus import scan, sidecar

SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital", "guitar", "onion"]


@pytest.fixture(scope="module")
def converted(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "emb"
    assert main(["convert", "--base", str(tiny_qwen2), "--out", str(out), "--pooling", "mean", "--dtype",
                 "float32"]) == 0
    return out


def write_jsonl(path, count):
    rows = [{"_id": f"d{i}", "title": SUBJECTS[i % 10].title() if i % 3 else "",
             "text": f"A {SUBJECTS[i % 10]} number {i} is on the street."} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [(f"{r['title']} {r['text']}".strip(), r["_id"]) for r in rows]


def test_jsonl_in_chunks_equals_one_encode_and_writes_the_ids(converted, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "corpus.jsonl", 10)
    out = tmp_path / "out" / "emb.npy"
    assert main(["encode", str(converted), "--input", str(tmp_path / "corpus.jsonl"), "--output", str(out),
                 "--documents", "--id-field", "_id", "--chunk-size", "3", "--batch-size", "2"]) == 0
    assert "10 x 64 float32" in capsys.readouterr().out
    want = Embedder.from_pretrained(converted).encode_documents([text for text, _ in rows])
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert (tmp_path / "out" / "emb.npy.ids.txt").read_text().splitlines() == [row_id for _, row_id in rows]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emb.npy", "emb.npy.ids.txt"]  # no sidecars


def test_scan_holds_no_text_and_finds_every_chunk(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    corpus = scan(path, chunk_size=4)
    assert (corpus.rows, len(corpus.offsets), corpus.line_numbers) == (10, 3, [1, 5, 9])
    assert corpus.read_chunk(2)[0] == ["line 8", "line 9"]
    assert corpus.read_chunk(1)[1] == [f"{path}:{n}" for n in (5, 6, 7, 8)]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"text": "a"}\n{"text": "b"\n', [], r"corpus.jsonl:2: not valid JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', [], r"corpus.jsonl:2: field 'text' must be a non-empty string"),
        ('{"text": "a", "_id": 1}\n{"text": "b"}\n', ["--id-field", "_id"], r"corpus.jsonl:2: missing id field '_id'"),
        ('{"text": "a"}\n', ["--chunk-size", "0"], r"chunk size must be at least 1"),
    ],
)
def test_bad_input_is_one_line_naming_the_row(converted, tmp_path, capsys, content, extra, message):
    (tmp_path / "corpus.jsonl").write_text(content)
    code = main(["encode", str(converted), "--input", str(tmp_path / "corpus.jsonl"), "--output",
                 str(tmp_path / "e.npy"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "e.npy").exists()


def test_a_killed_run_resumes_after_its_last_chunk(converted, tmp_path):
    rows = write_jsonl(tmp_path / "corpus.jsonl", 3000)
    out = tmp_path / "emb.npy"
    command = [sys.executable, "-m", "llm2emb.cli", "encode", str(converted), "--input", str(tmp_path / "corpus.jsonl"),
               "--output", str(out), "--chunk-size", "100", "--batch-size", "50", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = sidecar(out, "progress-0.json")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text())) >= 2:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(json.loads(progress.read_text()))
    assert not out.exists() and 2 <= done < 30, done  # killed part-way: no output yet, some chunks recorded
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {100 * done} of 3000 rows" in result.stderr
    assert f"{100 * done} rows kept from an interrupted run" in result.stdout
    want = Embedder.from_pretrained(converted).encode([text for text, _ in rows], batch_size=50)
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "emb.npy"]


def test_another_model_or_input_starts_over(converted, tiny_qwen2, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a cat\na dog\n")
    out = tmp_path / "e.npy"
    # An interrupted run of other settings leaves its plan and a partial file with garbage rows behind.
    np.lib.format.open_memmap(sidecar(out, "partial.npy"), mode="w+", dtype=np.float32, shape=(2, 64))[:] = 7.0
    sidecar(out, "plan.json").write_text(json.dumps({"format": 1, "rows": 2, "instruction": "other"}))
    sidecar(out, "progress-0.json").write_text("[0]\n")
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), Embedder.from_pretrained(converted).encode(["a cat", "a dog"]), atol=1e-5)


def test_stdin_is_spooled_and_removed(converted, tmp_path):
    out = tmp_path / "e.npy"
    result = subprocess.run([sys.executable, "-m", "llm2emb.cli", "encode", str(converted), "--input", "-",
                             "--output", str(out)], input="a cat\na dog\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert np.load(out).shape == (2, 64) and sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]


@pytest.mark.slow
def test_two_processes_write_one_output_equal_to_one_process(converted, tmp_path):
    rows = write_jsonl(tmp_path / "corpus.jsonl", 23)
    out = tmp_path / "emb.npy"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm2emb.cli", "encode",
               str(converted), "--input", str(tmp_path / "corpus.jsonl"), "--output", str(out), "--chunk-size", "4",
               "--id-field", "_id"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1
    want = Embedder.from_pretrained(converted).encode([text for text, _ in rows])
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert len((tmp_path / "emb.npy.ids.txt").read_text().splitlines()) == 23


def test_scan_refuses_what_has_no_rows(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="input has no text lines"):
        scan(tmp_path / "blank.jsonl")


def test_chunks_write_one_row_per_situated_chunk_and_an_index(converted, tmp_path, capsys):
    documents = ["A cat sat. It purred loudly! Then it slept.", "One line only", "Dogs bark. Birds sing."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                 for i, t in enumerate(documents)))
    out = tmp_path / "chunks.npy"
    assert main(["encode", str(converted), "--input", str(tmp_path / "docs.jsonl"), "--output", str(out),
                 "--documents", "--chunks", "sentences", "--id-field", "_id", "--chunk-size", "2"]) == 0
    assert "6 x 64 float32" in capsys.readouterr().out
    want = Embedder.from_pretrained(converted).encode_chunks(documents)
    np.testing.assert_allclose(np.load(out), np.concatenate([c.vectors for c in want]), atol=1e-5)
    index = [json.loads(line) for line in (tmp_path / "chunks.npy.chunks.jsonl").read_text().splitlines()]
    assert [(r["row"], r["id"], documents[r["row"]][r["start"]:r["end"]]) for r in index] == [
        (0, "d0", "A cat sat."), (0, "d0", "It purred loudly!"), (0, "d0", "Then it slept."),
        (1, "d1", "One line only"), (2, "d2", "Dogs bark."), (2, "d2", "Birds sing.")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chunks", "paragraphs"], r"chunker 'paragraphs': expected 'sentences' or 'words:N'"),
        (["--window", "64"], r"--window sizes the forwards of --chunks"),
        (["--chunks", "sentences", "--layers", "1"], r"--layers and --max-tokens are not available with --chunks"),
        (["--chunks", "sentences", "--window", "1"], r"--window must be at least 2 tokens, got 1"),
    ],
)
def test_chunk_options_are_checked(converted, tmp_path, capsys, extra, message):
    (tmp_path / "t.txt").write_text("a cat. a dog.\n")
    code = main(["encode", str(converted), "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "e.npy"),
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "e.npy").exists()
