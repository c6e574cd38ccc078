"""Reading data files, one way for training, evaluation and mining: JSONL and CSV/TSV records, BEIR qrels, pairs.

Every record carries its location (`file:line`), and every problem names it, so a user fixes the data rather than
reading a traceback. The lenient readers (`jsonl_records`, `delimited_records`, `qrel_pairs`) yield a `BadRow` in
place of a malformed record, for callers that may skip such rows (`on_bad_rows: skip`); the strict ones
(`read_jsonl`, `read_qrels`) raise `UserError` at the first problem.

A JSONL or TSV file must end with a line break: a file cut short at any byte other than a line end has a last line
without one, and that line may still parse (a TSV row whose last cell lost its end), so a missing line end is
refused rather than read as data. Bytes that are not UTF-8 are refused naming the file, not raised as a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from llm2emb.errors import UserError


class BadRow(ValueError):
    """One malformed record; its message starts with the record's location."""


def require_line_end(path: Path) -> None:
    """Refuse a non-empty file whose last byte is not a line break (see the module docstring)."""
    with Path(path).open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return
        handle.seek(-1, 2)
        if handle.read(1) not in (b"\n", b"\r"):
            raise UserError(f"{path}: the last line has no line end, as in a file cut short; if the file is whole, "
                            "end it with a newline")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Check the file's end, then turn text that is not UTF-8 into one line naming the file."""
    require_line_end(path)
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at a line's position "
                        f"{exc.start}); convert it to UTF-8") from None


def jsonl_records(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    """(`file:line`, JSON object or BadRow) for every non-blank line."""
    with reading(path), Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            yield where, json_object(line, where)


def json_object(line: str, where: str) -> dict | BadRow:
    """One JSONL line as a JSON object, or the BadRow that says why it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(f"{where}: not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return BadRow(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def delimited_records(path: Path, delimiter: str) -> Iterator[tuple[str, dict | BadRow]]:
    """(`file:line`, {header: cell} or BadRow) for every non-empty row after the header; tabs are never quotes."""
    with reading(path), Path(path).open(newline="", encoding="utf-8") as handle:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise BadRow(f"{path}:1: empty file, expected a header row")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                yield where, BadRow(f"{where}: expected {len(header)} columns, got {len(row)}")
                continue
            yield where, dict(zip(header, row))


def read_jsonl(path: Path, required: tuple[str, ...], missing_hint: str = "") -> list[dict]:
    """Every JSON object of a JSONL file, each holding the `required` fields; the first problem raises."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found{missing_hint}")
    rows = []
    for where, record in jsonl_records(path):
        if isinstance(record, BadRow):
            raise UserError(str(record))
        missing = [key for key in required if key not in record]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
        rows.append(record)
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, float]]:
    """`query-id  corpus-id  score` TSV (header optional) -> {query: {doc: score}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: qrels file not found")
    qrels: dict[str, dict[str, float]] = {}
    with reading(path), path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if line_no == 1 and row[0] == "query-id":
                continue
            if len(row) != 3:
                raise UserError(f"{path}:{line_no}: expected query-id, corpus-id, score; got {len(row)} columns")
            try:
                score = float(row[2])
            except ValueError:
                raise UserError(f"{path}:{line_no}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def document_text(row: dict, text_field: str = "text") -> str:
    """Title and text joined by a space, as BEIR and MTEB do (`(title + " " + text).strip()`)."""
    title = row.get("title") or ""
    text = row[text_field]
    return (title + " " + text).strip() if isinstance(title, str) and title.strip() else text


def qrel_pairs(
    queries: Mapping[str, str], documents: Mapping[str, str], qrels: Mapping[str, Mapping[str, float]], qrels_file: Path | str
) -> Iterator[tuple[str, str, str | BadRow]]:
    """(location, query text, document text) for every judgement with relevance > 0, in `queries` order; the
    document of a judgement whose id is not in `documents` is a BadRow."""
    for query_id, query in queries.items():
        for doc_id, relevance in qrels.get(query_id, {}).items():
            if relevance <= 0:
                continue
            where = f"{qrels_file}: query {query_id}, document {doc_id}"
            if doc_id not in documents:
                yield where, query, BadRow(f"{where}: document id not in the corpus")
            else:
                yield where, query, documents[doc_id]
