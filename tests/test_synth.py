"""`llm2emb synth`: cleaning, the consistency filter, seeded and resumable generation with a real causal LM."""

from __future__ import annotations

import json

import pytest
import torch

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.commands.synth import Generator, clean, consistency_filter, synthesize
from llm2emb.errors import UserError
from llm2emb.retrieval.corpus import scan

DOCUMENTS = [f"A {animal} number {i} sleeps on the {place} near the old harbour wall."
             for i, (animal, place) in enumerate([("cat", "mat"), ("dog", "rug"), ("owl", "roof"), ("fox", "hill"),
                                                   ("eel", "pier"), ("yak", "barn")])]


def test_cleaning_keeps_one_plain_line_and_says_why_it_drops():
    document = "Aspirin inhibits cyclooxygenase and lowers fever in adults."
    assert clean('Question: "What does aspirin inhibit?"\nMore text', document) == ("What does aspirin inhibit?", "")
    assert clean("What does aspirin inhibit? It is an enzyme.", document, "question") == ("What does aspirin inhibit?", "")
    assert clean("Aspirin inhibits an enzyme.", document, "question") == (None, "not a question")
    assert clean("This passage explains how aspirin works.", document) == (None, "talks about the passage")
    assert clean("You have provided a clear claim here.", document) == (None, "talks about the passage")
    assert clean("1. Claim: Aspirin lowers fever.", document) == ("Aspirin lowers fever.", "")
    framed = "The passage supports a claim by suggesting that aspirin lowers fever in children. However, it does not."
    assert clean(framed, document, "claim") == ("Aspirin lowers fever in children.", "")
    assert clean("This passage suggests that aspirin lowers fever. The passage is short.", document) == (
        "Aspirin lowers fever.", "")
    assert clean("The claim is that industrial yeast strains share a few lineages.", document, "claim") == (
        "Industrial yeast strains share a few lineages.", "")
    assert clean("The claim is: The claim is: Aspirin lowers fever.", document, "claim") == ("Aspirin lowers fever.", "")
    echo = "Aspirin lowers fever, but it also refutes the claim that it helps children."
    assert clean(echo, document, "claim") == (None, "talks about the task")
    assert clean(echo, document, "paraphrase") == (echo, "")  # only a task's own words count as an echo
    assert clean("Which question does aspirin answer about fever?", document, "question") == (None, "talks about the task")
    assert clean("yes", document) == (None, "too short")
    assert clean("the the the the the the cat", document) == (None, "repetitive")
    assert clean("inhibits cyclooxygenase and lowers fever", document) == (None, "copied from the document")
    assert clean(" ".join(["word"] * 3 + [f"w{i}" for i in range(70)]), document) == (None, "too long")


@pytest.fixture(scope="module")
def embedder(tiny_qwen2):
    return Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32)


def test_the_filter_keeps_a_row_only_when_its_document_ranks_in_the_top_k(embedder):
    rows = [{"query": DOCUMENTS[0], "source_index": 0, "instruction": None},  # the document itself: ranks first
            {"query": DOCUMENTS[2], "source_index": 1, "instruction": None}]  # another document's text
    assert consistency_filter(embedder, rows, DOCUMENTS, top_k=1) == [True, False]
    assert consistency_filter(embedder, rows, DOCUMENTS, top_k=len(DOCUMENTS)) == [True, True]


class CrashingGenerator(Generator):
    """The real generator, killed on its `crash_at`-th call (a run interrupted part-way)."""

    crash_at: int | None = None
    calls = 0

    def __call__(self, prompts, seed):
        type(self).calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise KeyboardInterrupt
        return super().__call__(prompts, seed)


def test_generation_is_seeded_and_a_killed_run_resumes_to_the_same_rows(tiny_qwen2, embedder, tmp_path):
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                   for i, t in enumerate(DOCUMENTS)))
    corpus = scan(tmp_path / "corpus.jsonl", id_field="_id", chunk_size=2)
    generator = CrashingGenerator(str(tiny_qwen2), max_new_tokens=24, temperature=1.0)
    options = dict(tasks=["question", "keywords"], negatives=True, batch_size=3, seed=7, progress=False, top_k=6,
                   embedder=embedder)
    whole = synthesize(corpus, generator, tmp_path / "a.jsonl", **options)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert whole.kept == len(rows) > 0 and whole.generated == 12 and whole.documents == 6
    assert all(r["task"] in ("question", "keywords") and r["source"].startswith("d") for r in rows)
    assert all(r["positive"] == DOCUMENTS[int(r["source"][1:])] and "source_index" not in r for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "corpus.jsonl"]  # no sidecars left
    CrashingGenerator.calls, generator.crash_at = 0, 5  # four calls a chunk (2 x 2 prompts in 3s, + negatives)
    with pytest.raises(KeyboardInterrupt):
        synthesize(corpus, generator, tmp_path / "b.jsonl", **options)
    assert not (tmp_path / "b.jsonl").exists()
    generator.crash_at = None
    resumed = synthesize(corpus, generator, tmp_path / "b.jsonl", **options)
    assert resumed.resumed_chunks == 1
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    other = synthesize(corpus, generator, tmp_path / "c.jsonl", **{**options, "seed": 8})
    assert other.generated == 12 and (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()


def test_cli_limits_documents_and_refuses_bad_options(tiny_qwen2, tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("\n".join(DOCUMENTS) + "\n")
    code = main(["synth", "--corpus", str(tmp_path / "docs.txt"), "--generator", str(tiny_qwen2), "--out",
                 str(tmp_path / "rows.jsonl"), "--limit", "3", "--tasks", "claim", "paraphrase", "--quiet",
                 "--max-new-tokens", "24", "--temperature", "1.0"])
    out = capsys.readouterr().out
    assert code == 0 and "from 3 documents" in out
    assert {json.loads(line)["source"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()} <= {0, 1, 2}
    assert main(["synth", "--corpus", str(tmp_path / "docs.txt"), "--generator", str(tiny_qwen2), "--out",
                 str(tmp_path / "x.jsonl"), "--tasks", "poem"]) == 2
    assert "--tasks poem: expected some of question, claim, paraphrase, keywords" in capsys.readouterr().err
    with pytest.raises(UserError, match="input file not found"):
        scan(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("extra", "message"), [
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--temperature", "0"], "--temperature must be above 0, got 0.0"),
])
def test_synth_options_are_checked_before_loading(tmp_path, capsys, extra, message):
    (tmp_path / "docs.txt").write_text("One document here.\n")
    code = main(["synth", "--corpus", str(tmp_path / "docs.txt"), "--generator", "unused", "--out",
                 str(tmp_path / "rows.jsonl"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "rows.jsonl").exists()
