"""`llm2emb synth`: training rows written by an instruct decoder for a corpus, kept only when they are consistent.

As QZhou-Embedding and Llama-Embed-Nemotron build their synthetic data: for each document a generator (any
transformers causal LM; the same base, e.g. SmolLM2-135M-Instruct, runs on a CPU) writes a query of each asked task
type (a question the document answers, a claim it supports or refutes, a one-sentence paraphrase, a keyword query)
and optionally a hard negative (a sentence on the same topic that does not answer the query). Generations are cut to
their first sentence and stripped of labels, quotes and framing ("The passage suggests that X" keeps X); empty, too
short or too long, repetitive (one word over half of the words), copied (the query inside its document) and off-task
ones (talking about "the passage" or to "you", a question without a question mark) are dropped, and so are repeats.
The consistency filter then keeps a row only when an embedder ranks its source document in the top-k of the corpus
for the query.

Generation runs chunk by chunk; each finished chunk's rows are written to a hidden file of their own beside the
output, so a killed run started again with the same settings continues with the chunks it had not finished, and sampling is seeded per chunk,
so the result equals an uninterrupted run's. The output (`query`, `positive`, `negative`, `instruction`, `task`,
`source`) is what a recipe's dataset reads, written atomically once every chunk is done and filtered.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llm2emb.errors import UserError
from llm2emb.files import write_text_atomic
from llm2emb.retrieval.chunking import sentence_spans
from llm2emb.retrieval.corpus import Corpus, scan, sidecar

TASKS = {
    "question": ("Write one question that the following passage answers. Reply with the question only.",
                 "Given a question, retrieve passages that answer the question"),
    "claim": ("Write one claim that the following passage supports or refutes. Reply with the claim only.",
              "Given a claim, retrieve documents that support or refute the claim"),
    "paraphrase": ("Paraphrase the main point of the following text in one sentence. Reply with the sentence only.",
                   "Retrieve texts that say the same thing as the given sentence"),
    "keywords": ("Write a short web search query of three to six keywords that should find the following passage. "
                 "Reply with the query only.", "Given a web search query, retrieve relevant passages"),
}
"""Task type -> (what the generator is asked, the instruction the row's query gets for training)."""
NEGATIVE_PROMPT = ("Write one sentence on the same topic as the passage that does not answer \"{query}\". Reply with "
                   "the sentence only.")
LABEL = re.compile(r"^\s*(?:[-*\d.)\s]*)?(?:(?:the|our|this|my) )?(?:question|claim|query|paraphrase|sentence|answer|"
                   r"search query)(?: is)?\s*:\s*", re.IGNORECASE)
"""'Claim: X', '1. Question: X', 'The claim is: X' (SmolLM2-135M sometimes writes the label twice)."""
FRAMING = re.compile(r"^(?:the|this) (?:passage|text|document|abstract|study|claim)(?: \w+){0,3}? (?:is|supports|refutes|suggests|"
                     r"shows|states|indicates|claims|argues|demonstrates|finds|concludes|reports|proposes)(?: \w+){0,4}? "
                     r"that\s+", re.IGNORECASE)
"""'The passage supports the claim that X ...', 'The claim is that X': how small generators frame a claim; X is the
claim (SmolLM2-135M wrote the second in SciFact runs, 2026-12-04)."""
META = re.compile(r"\b(?:the|this|that) (?:passage|text|document)\b|\b(?:you|your)\b", re.IGNORECASE)
"""A generation that talks about the passage or to the reader instead of being a query (small generators do)."""
ECHO = {"question": re.compile(r"\bquestions?\b", re.IGNORECASE),
        "claim": re.compile(r"\bclaims?\b|\brefut\w*", re.IGNORECASE),
        "paraphrase": re.compile(r"\bparaphras\w*|\bmain point\b", re.IGNORECASE),
        "keywords": re.compile(r"\bkeywords?\b|\bsearch query\b", re.IGNORECASE)}
"""Words of a task's own request: a generation that still uses them after unframing talks about the task instead of
doing it ('X, but it also refutes the claim that Y': 50 of the 294 claims SmolLM2-135M wrote for SciFact documents
on 2026-12-04 that the earlier cleaner kept; none of SciFact's 1,109 real claims says 'claim' or 'refute')."""
PASSAGE_CHARACTERS = 2000
"""A document is cut to this many characters in the prompt (a small generator loses the thread on long inputs)."""
PLAN_FORMAT = 1


@dataclass
class SynthStats:
    documents: int = 0
    generated: int = 0
    """Generations made by this run (a resumed run's earlier chunks are not counted)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Generations dropped in cleaning by this run, and repeats dropped over all rows, by reason."""
    candidates: int = 0
    """Clean, distinct rows that met the consistency filter."""
    dropped_by_filter: int = 0
    kept: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    resumed_chunks: int = 0

    def format(self, output: Path) -> str:
        rate = (f"{self.generated / self.seconds:.2f} generations/s, {self.new_tokens / self.seconds:.0f} tokens/s"
                if self.generated else "nothing generated now")
        share = f"{100 * self.kept / max(self.candidates, 1):.0f}%"
        return (f"wrote {output}: {self.kept} rows from {self.documents} documents ({self.candidates} clean, "
                f"{share} kept by the consistency filter); dropped in cleaning: {self.dropped or 'none'}; {rate}")


def clean(text: str, document: str, task: str | None = None) -> tuple[str | None, str]:
    """A generation as a usable text, or None and why not: its first sentence, unframed ('The passage supports the
    claim that X' gives X); a question ends at its first question mark."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    unlabelled = None
    while unlabelled != line:  # 'The claim is: The claim is: X'
        unlabelled, line = line, LABEL.sub("", line).strip().strip("\"'`*").strip()
    framed = FRAMING.match(line)
    if framed:
        line = line[framed.end():]
        line = line[:1].upper() + line[1:]
    sentences = sentence_spans(line)
    line = line[:sentences[0][1]] if sentences else line  # a query is one sentence; what follows is commentary
    if META.search(line):
        return None, "talks about the passage"
    if task in ECHO and ECHO[task].search(line):
        return None, "talks about the task"
    if task == "question":
        if "?" not in line:
            return None, "not a question"
        line = line[:line.index("?") + 1]
    words = line.split()
    if len(words) < 3:
        return None, "too short"
    if len(words) > 64:
        return None, "too long"
    counts = {}
    for word in words:
        counts[word.lower()] = counts.get(word.lower(), 0) + 1
    if len(words) >= 6 and max(counts.values()) > len(words) / 2:
        return None, "repetitive"
    if len(line) > 20 and line.lower() in document.lower():
        return None, "copied from the document"
    return line, ""


def consistency_filter(embedder, rows: list[dict], documents: Sequence[str], top_k: int,
                       batch_size: int = 32) -> list[bool]:
    """For each row, whether the embedder ranks its source document (`rows[i]["source_index"]`, a position in
    `documents`) among the top_k of `documents` for its query (with its instruction)."""
    from llm2emb.evaluate.search import top_k as search

    if not rows:
        return []
    corpus = embedder.encode_documents(list(documents), batch_size=batch_size)
    keep = [False] * len(rows)
    by_instruction: dict[str | None, list[int]] = {}
    for index, row in enumerate(rows):
        by_instruction.setdefault(row.get("instruction"), []).append(index)
    for instruction, members in by_instruction.items():
        queries = embedder.encode([rows[i]["query"] for i in members], instruction=instruction, batch_size=batch_size)
        found, _ = search(queries, corpus, top_k)
        for member, hits in zip(members, found):
            keep[member] = rows[member]["source_index"] in set(hits.tolist())
    return keep


class Generator:
    """A causal LM that answers prompts, through its chat template when it has one; sampling seeded per call."""

    def __init__(self, reference: str, max_new_tokens: int = 48, temperature: float = 0.7, device: str | None = None):
        from transformers import AutoModelForCausalLM

        from llm2emb.model.backbone import load_pretrained, load_tokenizer, resolve_base

        base = resolve_base(reference)
        self.tokenizer = load_tokenizer(base, padding_side="left")
        self.model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32)  # one line if it cannot
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device).eval()
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def prompt(self, request: str, passage: str) -> str:
        content = f"{request}\n\nPassage: {passage[:PASSAGE_CHARACTERS]}"
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{content}\n\nReply:"

    @torch.inference_mode()
    def __call__(self, prompts: list[str], seed: int) -> tuple[list[str], int]:
        """Completions of `prompts` (sampled with `seed`), and the new tokens generated."""
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        generator_seed = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        output = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=True,
                                     temperature=self.temperature, top_p=0.9,
                                     pad_token_id=self.tokenizer.pad_token_id)
        new = output[:, encoded["input_ids"].shape[1]:]
        tokens = int((new != self.tokenizer.pad_token_id).sum())
        return self.tokenizer.batch_decode(new, skip_special_tokens=True), tokens


def synthesize(
    corpus: Corpus,
    generator: Generator,
    output: str | Path,
    tasks: Sequence[str] = ("question",),
    negatives: bool = False,
    embedder=None,
    top_k: int = 5,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    limit: int | None = None,
) -> SynthStats:
    """Generate, clean and filter rows for every document of `corpus` (the first `limit`) into `output` (see the
    module doc). The filter encodes every document once, so the corpus's vectors must fit in memory."""
    from tqdm.auto import tqdm

    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise UserError(f"--tasks {unknown[0]}: expected some of {', '.join(TASKS)}")
    output = Path(output)
    plan_path = sidecar(output, "plan.json")
    stat = corpus.path.stat()
    plan = {"format": PLAN_FORMAT, "input": str(corpus.path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "chunk_size": corpus.chunk_size, "tasks": list(tasks),
            "negatives": negatives, "seed": seed, "generator": str(generator.model.name_or_path),
            "max_new_tokens": generator.max_new_tokens, "temperature": generator.temperature, "limit": limit}
    if not (plan_path.is_file() and json.loads(plan_path.read_text()) == plan):  # other settings: start over
        output.parent.mkdir(parents=True, exist_ok=True)
        for stale in _chunk_files(output):
            stale.unlink()
        write_text_atomic(plan_path, json.dumps(plan, indent=2) + "\n")
    done = {int(path.name.rsplit("-", 1)[1].split(".")[0]) for path in _chunk_files(output)}
    documents_total = corpus.rows if limit is None else min(limit, corpus.rows)
    stats = SynthStats(documents=documents_total, resumed_chunks=len(done))
    if done:
        print(f"resuming: {len(done)} of {len(corpus.offsets)} chunks were generated by an interrupted run",
              file=sys.stderr)
    started = time.perf_counter()
    bar = tqdm(total=documents_total, disable=not progress, desc="synth", unit="doc")
    chunks = -(-documents_total // corpus.chunk_size)
    with bar:
        for chunk in range(chunks):
            texts, _, ids = corpus.read_chunk(chunk)
            room = documents_total - chunk * corpus.chunk_size
            texts, ids = texts[:room], ids[:room]
            if chunk in done:
                bar.update(len(texts))
                continue
            rows = _generate_chunk(generator, texts, ids, chunk * corpus.chunk_size, tasks, negatives, batch_size,
                                   (seed, chunk), stats)
            # one file per chunk, written whole or not at all: a kill leaves finished chunks and nothing half-done
            write_text_atomic(sidecar(output, f"chunk-{chunk}.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
            bar.update(len(texts))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{stats.generated / elapsed:.2f} rows/s, {stats.new_tokens / elapsed:.0f} tokens/s")
    stats.seconds = time.perf_counter() - started
    rows, seen = [], set()
    lines = [line for chunk in range(chunks)
             for line in sidecar(output, f"chunk-{chunk}.jsonl").read_text(encoding="utf-8").splitlines()]
    for line in lines:
        row = json.loads(line)
        if row["query"].lower() in seen:
            stats.dropped["repeated"] = stats.dropped.get("repeated", 0) + 1
            continue
        seen.add(row["query"].lower())
        rows.append(row)
    stats.candidates = len(rows)
    if embedder is not None:
        documents = [text for chunk in range(chunks) for text in corpus.read_chunk(chunk)[0]][:documents_total]
        keep = consistency_filter(embedder, rows, documents, top_k)
        stats.dropped_by_filter = keep.count(False)
        rows = [row for row, kept in zip(rows, keep) if kept]
    stats.kept = len(rows)
    if not rows:
        raise UserError(f"{corpus.path}: no row survived cleaning and filtering (dropped: {stats.dropped}, "
                        f"{stats.dropped_by_filter} by the filter); nothing written")
    for row in rows:
        row.pop("source_index", None)
    write_text_atomic(output, "".join(json.dumps(row) + "\n" for row in rows))
    for stale in (plan_path, *_chunk_files(output)):
        stale.unlink(missing_ok=True)
    return stats


def _chunk_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.chunk-*.jsonl"))


def _generate_chunk(generator, texts, ids, first_row, tasks, negatives, batch_size, seed, stats) -> list[dict]:
    """Every task's query (and negative) for one chunk's documents, cleaned."""
    jobs = [(row, task) for row in range(len(texts)) for task in tasks]
    rows = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        prompts = [generator.prompt(TASKS[task][0], texts[row]) for row, task in batch]
        outputs, tokens = generator(prompts, seed=hash_seed(*seed, start, 0))
        stats.new_tokens += tokens
        made = []
        for (row, task), text in zip(batch, outputs):
            stats.generated += 1
            query, reason = clean(text, texts[row], task)
            if query is None:
                stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
                continue
            made.append({"query": query, "positive": texts[row], "instruction": TASKS[task][1], "task": task,
                         "source": ids[row] if ids[row] is not None else first_row + row,
                         "source_index": first_row + row})
        if negatives and made:
            prompts = [generator.prompt(NEGATIVE_PROMPT.format(query=r["query"]), r["positive"]) for r in made]
            outputs, tokens = generator(prompts, seed=hash_seed(*seed, start, 1))
            stats.new_tokens += tokens
            for row, text in zip(made, outputs):
                negative, _ = clean(text, row["positive"])
                if negative is not None and negative.lower() != row["query"].lower():
                    row["negative"] = negative
        rows.extend(made)
    return rows


def hash_seed(*parts: int) -> int:
    """A 31-bit seed from integers, the same in every process and run."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def synth_from_files(
    corpus_path: str | Path, generator: str, output: str | Path, text_field: str = "text",
    id_field: str | None = None, chunk_size: int = 64, embedder_reference: str | None = None,
    max_new_tokens: int = 48, temperature: float = 0.7, device: str | None = None, **kwargs,
) -> SynthStats:
    """The CLI's entry: scan the corpus, load the generator (and the filter's embedder) on `device` (default: the
    GPU when there is one), synthesize."""
    corpus = scan(Path(corpus_path), text_field=text_field, id_field=id_field, chunk_size=chunk_size)
    embedder = None
    if embedder_reference is not None:
        from llm2emb.model.embedder import Embedder

        embedder = Embedder.from_pretrained(embedder_reference, device=device)
    generator_model = Generator(generator, max_new_tokens=max_new_tokens, temperature=temperature, device=device)
    return synthesize(corpus, generator_model, output, embedder=embedder, **kwargs)
