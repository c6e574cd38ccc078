"""`llm2emb encode` for corpora of millions: streamed in chunks, written as it goes, resumable, split across processes.

The input is read twice and never held: a first pass checks every row (blank lines, JSON, the text field), counts
the rows and notes where each chunk of `chunk_size` rows starts; then each chunk is read back from its offset,
encoded, and its rows written at their place in a `.npy` beside the output (`.<name>.partial.npy`, created at full
size up front; plain positioned writes, so the process's memory does not grow with the file). A chunk that is
written and flushed is recorded in a progress file, so a killed run started again with the same input, model and
settings skips what was done (`plan.json` holds what must match); anything else starts over. The partial file is
renamed to the output only when every chunk is done, so the output never exists half-written.

Under `torchrun --nproc_per_node N` every process takes every N-th chunk (on its own GPU when there are several),
writes its rows into the same file and its own progress file; process 0 finishes the file.

Inputs: a text file (one text per line; row i is line i, so a blank line is refused rather than dropped), or
JSONL (`.jsonl` / `.json`: one object per line, the text in `text_field`, joined after `title` when the object has
one, as BEIR corpora are; with `id_field`, the ids are written to `<output>.ids.txt`, line i for row i).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm2emb.errors import UserError
from llm2emb.files import atomic_path, exclusive_lock, save_npy_atomic, write_text_atomic
from llm2emb.model.tokenization import locate_texts
from llm2emb.readers import BadRow, document_text, json_object, require_line_end
from llm2emb.retrieval.precision import quantize

PLAN_FORMAT = 1


@dataclass
class Corpus:
    """Where the rows of an input file are, found by one pass that holds no text."""

    path: Path
    jsonl: bool
    text_field: str = "text"
    id_field: str | None = None
    chunk_size: int = 4096
    rows: int = 0
    offsets: list[int] = field(default_factory=list)
    """Byte offset of the first line of every chunk."""
    line_numbers: list[int] = field(default_factory=list)
    """Line number (1-based) of the first row of every chunk, for error locations."""
    chunker: str | None = None
    """Situated chunks (llm2emb.retrieval.chunking): `sentences` or `words:N` split each row into several output rows."""
    vector_counts: list[int] = field(default_factory=list)
    """Output rows of every chunk: its rows, or with `chunker` its rows' text chunks."""

    @property
    def vectors(self) -> int:
        return sum(self.vector_counts)

    def spans(self, text: str, where: str) -> list[tuple[int, int]]:
        """The text chunks of one row (with `chunker`), refused with the row's location when there are none."""
        from llm2emb.retrieval.chunking import check_spans, chunker_from_spec

        return check_spans(text, chunker_from_spec(self.chunker)(text), where)

    def read_chunk(self, chunk: int) -> tuple[list[str], list[str], list[str | None]]:
        """(texts, locations, ids) of one chunk's rows."""
        texts, where, ids = [], [], []
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[chunk])
            for line_number, text, row_id in self._rows(handle, self.line_numbers[chunk]):
                texts.append(text)
                where.append(f"{self.path}:{line_number}")
                ids.append(row_id)
                if len(texts) == self.chunk_size:
                    break
        return texts, where, ids

    def _rows(self, handle, first_line: int) -> Iterator[tuple[int, str, str | None]]:
        """(line number, text, id) of every row from the handle's position; the checks of `scan`."""
        for line_number, raw in enumerate(handle, start=first_line):
            line = _decode(raw, self.path, line_number).rstrip("\r\n")
            if not self.jsonl:
                yield line_number, line, None
                continue
            if not line.strip():
                continue
            record = json_object(line, f"{self.path}:{line_number}")
            if isinstance(record, BadRow):
                raise UserError(str(record))
            text = record.get(self.text_field)
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{self.path}:{line_number}: field {self.text_field!r} must be a non-empty string")
            text = document_text(record, self.text_field)
            row_id = None
            if self.id_field is not None:
                if self.id_field not in record:
                    raise UserError(f"{self.path}:{line_number}: missing id field {self.id_field!r}")
                row_id = str(record[self.id_field])
            yield line_number, text, row_id


def _decode(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}:{line_number}: not UTF-8 text (byte {exc.start})") from None


def scan(path: Path, text_field: str = "text", id_field: str | None = None, chunk_size: int = 4096,
         chunker: str | None = None) -> Corpus:
    """Check every row and note where each chunk starts; blank text lines are refused with their numbers.

    With `chunker` every row is split here already, so the output's size is known before encoding starts."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, got {chunk_size}")
    if chunker is not None:
        from llm2emb.retrieval.chunking import chunker_from_spec

        chunker_from_spec(chunker)  # a bad spec fails before the pass
    if jsonl:
        require_line_end(path)
    corpus = Corpus(path, jsonl, text_field, id_field, chunk_size, chunker=chunker)
    blank: list[int] = []
    blank_count = 0
    with path.open("rb") as handle:
        offset, line_number = 0, 0
        for raw in handle:
            line_number += 1
            start, offset = offset, offset + len(raw)
            line = _decode(raw, path, line_number).rstrip("\r\n")
            if not line.strip():
                if not jsonl:
                    blank_count += 1
                    if len(blank) < 10:
                        blank.append(line_number)
                continue
            if corpus.rows % chunk_size == 0:
                corpus.offsets.append(start)
                corpus.line_numbers.append(line_number)
                corpus.vector_counts.append(0)
            vectors = 1
            if jsonl or chunker:  # the same checks the encoding pass makes, so a bad row fails before any encoding
                _, text, _ = next(corpus._rows([raw], line_number))
                if chunker:
                    vectors = len(corpus.spans(text, f"{path}:{line_number}"))
            corpus.vector_counts[-1] += vectors
            corpus.rows += 1
    if not corpus.rows:
        raise UserError(f"{path}: input has no text lines")
    if blank_count:
        more = f" and {blank_count - len(blank)} more" if blank_count > len(blank) else ""
        raise UserError(f"{path}: blank line(s) {', '.join(map(str, blank))}{more}: each line is one text and row i "
                        "of the output is line i, so remove them (or put text on them)")
    return corpus


@dataclass
class EncodeStats:
    rows: int
    dim: int
    seconds: float
    texts: int = 0
    tokens: int = 0
    resumed_rows: int = 0
    precision: str = "float32"
    device: str = "cpu"

    def format(self, output: Path) -> str:
        rate = f"{self.texts / self.seconds:.1f} texts/s, {self.tokens / self.seconds:.0f} tokens/s" if self.seconds else ""
        resumed = f", {self.resumed_rows} rows kept from an interrupted run" if self.resumed_rows else ""
        kind = "float32" if self.precision == "float32" else f"{self.precision} codes"
        return f"wrote {output}: {self.rows} x {self.dim} {kind} on {self.device} ({rate}{resumed})"


def sidecar(output: Path, suffix: str) -> Path:
    """A hidden file beside the output that belongs to its run (`.out.npy.partial.npy`, `.out.npy.plan.json`)."""
    return output.with_name(f".{output.name}.{suffix}")


def encode_corpus(
    embedder,
    corpus: Corpus,
    output: str | Path,
    instruction: str | None = None,
    documents: bool = False,
    batch_size: int = 32,
    dim: int | None = None,
    layers: int | None = None,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    progress: bool = True,
    precision: str = "float32",
    ranges: np.ndarray | None = None,
    window: int | None = None,
) -> EncodeStats:
    """Encode `corpus` into `output` (.npy) chunk by chunk; see the module doc. `barrier` synchronises processes.

    `precision` writes compressed codes (llm2emb.retrieval.precision); int8/uint8 need calibration `ranges`, which are saved
    beside the output (`<output>.ranges.npy`) so that queries can be quantized alike. A corpus scanned with a
    `chunker` gets one row per text chunk, each embedded in its row's context (`Embedder.encode_chunks`, forwards of
    at most `window` tokens), and `<output>.chunks.jsonl` says which row and character span each output row is."""
    output = Path(output)
    if corpus.chunker and (layers or max_tokens):
        raise UserError("--layers and --max-tokens are not available with --chunks")
    output.parent.mkdir(parents=True, exist_ok=True)
    # one lock per process rank: a second encode into the same output is refused at once, whether it runs alone or
    # under torchrun (its rank r meets this run's rank r), and the processes of one torchrun run share the output
    with exclusive_lock(sidecar(output, f"lock-{rank}"), "--output", output):
        return _encode_locked(embedder, corpus, output, instruction, documents, batch_size, dim, layers, max_tokens,
                              rank, world_size, barrier, progress, precision, ranges, window)


def _encode_locked(embedder, corpus: Corpus, output: Path, instruction, documents, batch_size, dim, layers,
                   max_tokens, rank, world_size, barrier, progress, precision, ranges, window) -> EncodeStats:
    """`encode_corpus` while this process holds the output's lock."""
    from tqdm.auto import tqdm

    from llm2emb.evaluate.cache import model_fingerprint

    width = dim or embedder.dim
    probe = quantize(np.zeros((1, width), np.float32), precision, ranges)  # the codes' dtype and row width
    partial, plan_path = sidecar(output, "partial.npy"), sidecar(output, "plan.json")
    stat = corpus.path.stat()
    plan = {
        "format": PLAN_FORMAT, "input": str(corpus.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "rows": corpus.rows, "chunk_size": corpus.chunk_size, "dim": width, "model": model_fingerprint(embedder),
        "instruction": instruction, "documents": documents, "layers": layers, "text_field": corpus.text_field,
        "precision": precision, "ranges": None if ranges is None else hashlib.sha256(ranges.tobytes()).hexdigest(),
        "chunker": corpus.chunker, "window": window,
    }
    chunks = len(corpus.offsets)
    if rank == 0:
        kept = plan_path.is_file() and partial.is_file() and json.loads(plan_path.read_text()) == plan
        if not kept:
            for stale in (partial, *_progress_files(output)):
                stale.unlink(missing_ok=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(partial, mode="w+", dtype=probe.dtype, shape=(corpus.vectors, probe.shape[1])).flush()
            write_text_atomic(plan_path, json.dumps(plan, indent=2) + "\n")
    barrier()
    done = set().union(*(set(json.loads(p.read_text())) for p in _progress_files(output)))
    resumed_rows = sum(corpus.vector_counts[c] for c in done)
    if rank == 0 and done:
        print(f"resuming: {resumed_rows} of {corpus.vectors} rows were encoded by an interrupted run", file=sys.stderr)
    mine = [c for c in range(chunks) if c % world_size == rank and c not in done]
    offset = _data_offset(partial)
    progress_path = sidecar(output, f"progress-{rank}.json")
    finished = sorted(c for c in done if c % world_size == rank)
    kind = "document" if documents else "query"
    if documents and not instruction:
        instruction = embedder.config.default_document_instruction
    first_vector = np.cumsum([0] + corpus.vector_counts)
    stats = EncodeStats(corpus.vectors, width, 0.0, resumed_rows=resumed_rows, precision=precision,
                        device=str(embedder.device))
    from llm2emb.model.encoding import PROGRESS_BAR_MIN_TEXTS

    shown = progress and rank == 0 and corpus.rows >= PROGRESS_BAR_MIN_TEXTS
    bar = tqdm(total=sum(corpus.vector_counts[c] for c in mine), disable=not shown, desc=f"encode on {embedder.device}",
               unit="chunk" if corpus.chunker else "text")
    started = time.perf_counter()

    def advance(texts: int, tokens: int) -> None:
        stats.texts += texts
        stats.tokens += tokens
        elapsed = time.perf_counter() - started
        bar.update(texts)
        bar.set_postfix_str(f"{stats.texts / elapsed:.1f} texts/s, {stats.tokens / elapsed:.0f} tokens/s")

    with bar:
        for chunk in mine:
            texts, where, _ = corpus.read_chunk(chunk)
            with locate_texts(lambda i, where=where: where[i]):
                if corpus.chunker:
                    pieces = embedder.encode_chunks(
                        texts, spans=[corpus.spans(t, w) for t, w in zip(texts, where)], window=window,
                        instruction=instruction, kind=kind, batch_size=batch_size, dim=dim, show_progress_bar=False,
                        on_batch=advance, precision=precision, ranges=ranges)
                    vectors = np.concatenate([piece.vectors for piece in pieces])
                else:
                    vectors = embedder.encode(
                        texts, instruction=instruction, kind=kind, batch_size=batch_size, dim=dim, layers=layers,
                        max_tokens=max_tokens, show_progress_bar=False, on_batch=advance, precision=precision,
                        ranges=ranges)
            # Plain positioned writes, not a memory map: mapped pages would count in the process's memory.
            with partial.open("r+b") as handle:
                handle.seek(offset + int(first_vector[chunk]) * probe.nbytes)
                handle.write(np.ascontiguousarray(vectors, dtype=probe.dtype).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            finished.append(chunk)
            write_text_atomic(progress_path, json.dumps(finished) + "\n")
    stats.seconds = time.perf_counter() - started
    barrier()
    if rank == 0:
        if corpus.id_field is not None:
            _write_ids(corpus, output)
        if corpus.chunker:
            _write_chunk_index(corpus, output)
        if ranges is not None:
            save_npy_atomic(output.with_name(output.name + ".ranges.npy"), ranges)
        os.replace(partial, output)
        for stale in (plan_path, *_progress_files(output)):
            stale.unlink(missing_ok=True)
    barrier()
    return stats


def _data_offset(path: Path) -> int:
    """Where the rows of a .npy file start (after its header)."""
    with path.open("rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        if major == 1:
            np.lib.format.read_array_header_1_0(handle)
        else:
            np.lib.format.read_array_header_2_0(handle)
        return handle.tell()


def _progress_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.progress-*.json"))


def _write_ids(corpus: Corpus, output: Path) -> None:
    """`<output>.ids.txt`, line i the id of row i, written atomically chunk by chunk (no texts held)."""
    target = output.with_name(output.name + ".ids.txt")
    with atomic_path(target) as staging, staging.open("w", encoding="utf-8") as handle:
        for chunk in range(len(corpus.offsets)):
            handle.writelines(f"{row_id}\n" for row_id in corpus.read_chunk(chunk)[2])


def _write_chunk_index(corpus: Corpus, output: Path) -> None:
    """`<output>.chunks.jsonl`: line i says which input row (and id) output row i comes from, and its span."""
    target = output.with_name(output.name + ".chunks.jsonl")
    with atomic_path(target) as staging, staging.open("w", encoding="utf-8") as handle:
        for chunk in range(len(corpus.offsets)):
            texts, where, ids = corpus.read_chunk(chunk)
            for number, (text, location, row_id) in enumerate(zip(texts, where, ids)):
                row = chunk * corpus.chunk_size + number
                for start, end in corpus.spans(text, location):
                    record = {"row": row, **({"id": row_id} if row_id is not None else {}), "start": start, "end": end}
                    handle.write(json.dumps(record) + "\n")
