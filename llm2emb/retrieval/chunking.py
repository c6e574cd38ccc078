"""Situated chunks (SitEmb): short chunks embedded in the context of the text around them.

A chunk embedded alone loses what its document says around it ("It binds the receptor." — what does?). Here the
document (or a window of it) runs through the model once and each chunk's vector pools only that chunk's tokens,
the way the pool mask already leaves an instruction out of a vector: the context shapes the chunk's hidden states
through attention but is not averaged into it.

A chunk is a character span of its document's text, from a chunker (`sentences`, `words:N`) or given by the caller.
When the document's prompt fits `window` tokens, one forward serves all its chunks. A longer document is covered by
windows of its text's tokens that overlap by half, every window keeping the prompt's template, instruction and
special tokens whole (the truncation rule of llm2emb.model.tokenization); each chunk is pooled from the window in which
it has the most context on its shorter side, or from a window centred on it when no window holds it whole, and a
chunk longer than a window keeps the window's worth of its first tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llm2emb.errors import UserError
from llm2emb.model.tokenization import PromptTokenizer, UnembeddableText, no_room_detail

Span = tuple[int, int]
Chunker = Callable[[str], list[Span]]

ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "vs.", "cf.", "Fig.", "Figs.", "Eq.", "Dr.", "Mr.", "Mrs.", "Ms.",
                 "St.", "approx.", "ca.", "resp.")
"""Words whose full stop does not end a sentence (scientific abstracts use them mid-sentence)."""
_NOT_ABBREVIATED = "".join(rf"(?<!\b{re.escape(word)})" for word in ABBREVIATIONS)
SENTENCE_END = re.compile(rf"(?<=[.!?]){_NOT_ABBREVIATED}([\"')\]]*)\s+(?![a-z])|(?<=[a-z0-9)\]][.!?])(?=[A-Z])|\n\s*\n")
"""A sentence ends after . ! or ? (and closing quotes or brackets) before whitespace and a word that does not start
in lower case, unless the stop closes an abbreviation ("e.g.", "et al."); or, when a lower-case word ends it, right
before a capital letter (abstracts scraped without spaces: "disabilities.A line scan"; "3.5" stays whole); or at a
blank line."""


def sentence_spans(text: str) -> list[Span]:
    """Character spans of the sentences of `text`, without the whitespace between them."""
    spans, start = [], 0
    for match in SENTENCE_END.finditer(text):
        spans.append((start, match.end(1) if match.group(1) is not None else match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [trimmed for span in spans if (trimmed := _strip(text, span)) is not None]


def word_spans(text: str, words: int) -> list[Span]:
    """Character spans of consecutive runs of `words` whitespace-separated words."""
    found = [m.span() for m in re.finditer(r"\S+", text)]
    return [(found[i][0], found[min(i + words, len(found)) - 1][1]) for i in range(0, len(found), words)]


def _strip(text: str, span: Span) -> Span | None:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def chunker_from_spec(spec: str | Chunker) -> Chunker:
    """`sentences`, `words:N` or a callable text -> spans."""
    if callable(spec):
        return spec
    if spec == "sentences":
        return sentence_spans
    name, _, count = spec.partition(":")
    if name == "words" and count.isdigit() and int(count) > 0:
        return lambda text: word_spans(text, int(count))
    raise UserError(f"chunker {spec!r}: expected 'sentences' or 'words:N' (N > 0)")


def check_spans(text: str, spans: Sequence[Span], where: str) -> list[Span]:
    """Spans as (start, end) ints inside the text, each holding a non-space character."""
    checked = []
    for number, span in enumerate(spans):
        try:
            start, end = (int(value) for value in span)
        except (TypeError, ValueError):
            raise UserError(f"{where}: chunk {number}: expected a (start, end) pair, got {span!r}") from None
        if not 0 <= start < end <= len(text):
            raise UserError(f"{where}: chunk {number}: span ({start}, {end}) is not inside the text "
                            f"({len(text)} characters)")
        if not text[start:end].strip():
            raise UserError(f"{where}: chunk {number}: span ({start}, {end}) holds only whitespace")
        checked.append((start, end))
    if not checked:
        raise UserError(f"{where}: no chunk to embed (the text is empty or the chunker found none)")
    return checked


def place_windows(length: int, chunks: Sequence[Span], budget: int) -> list[tuple[int, list[int]]]:
    """Windows over `length` text tokens, at most `budget` each: (start, indices of the chunks pooled from it).

    Chunks are token spans [start, end). One window when the text fits; otherwise windows at every half budget
    (the last one ending at the text's end), each chunk taking the window that holds it whole with the most
    context on its shorter side, or one centred on it when none does.
    """
    if length <= budget:
        return [(0, list(range(len(chunks))))]
    stride = max(1, budget // 2)
    starts = sorted({*range(0, length - budget, stride), length - budget})
    assigned: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(chunks):
        holding = [a for a in starts if a <= start and end <= a + budget]
        if holding:
            window = max(holding, key=lambda a: (min(start - a, a + budget - end), -a))
        elif end - start >= budget:
            window = start
        else:
            window = min(max(0, (start + end - budget) // 2), length - budget)
        assigned.setdefault(window, []).append(index)
    return sorted(assigned.items())


@dataclass(frozen=True)
class ChunkWindow:
    """One forward's ids, and the pool mask of each chunk read from it (`chunks[i]` is the chunk's index)."""

    ids: list[int]
    chunks: list[int]
    pools: list[list[int]]


def chunk_windows(
    prompt_tokenizer: PromptTokenizer,
    text: str,
    spans: Sequence[Span],
    instruction: str | None = None,
    kind: str = "document",
    window: int | None = None,
    index: int = 0,
) -> list[ChunkWindow]:
    """The forwards that embed `spans` of `text` in context, at most `window` tokens each (default: max_length).

    `UnembeddableText` (with `index`) when the prompt leaves no room for text or a chunk has no token of its own.
    """
    window = window or prompt_tokenizer.max_length
    located = prompt_tokenizer.locate_text(text, instruction, kind)
    if located is None:
        raise UnembeddableText(index, "the text is empty (no token to embed)")
    ids, offsets, first, last = located.ids, located.offsets, located.first, located.last
    prefix, body, suffix = ids[:first], ids[first:last + 1], ids[last + 1:]
    eos = [prompt_tokenizer.tokenizer.eos_token_id] if prompt_tokenizer.append_eos else []
    budget = window - len(prefix) - len(suffix) - len(eos)
    if budget < 1:
        raise UnembeddableText(index, no_room_detail(len(prefix) + len(suffix) + len(eos), window))
    token_spans = []
    for number, (start, end) in enumerate(spans):
        start, end = start + located.text_start, end + located.text_start
        inside = [i for i in range(first, last + 1) if offsets[i][1] > start and offsets[i][0] < end]
        if not inside:
            raise UnembeddableText(index, f"chunk {number} ({end - start} characters) has no token of its own")
        token_spans.append((inside[0] - first, inside[-1] - first + 1))
    windows = []
    for begin, members in place_windows(len(body), token_spans, budget):
        stop = min(begin + budget, len(body))
        row = prefix + body[begin:stop] + suffix + eos
        pools = []
        for member in members:
            start, end = token_spans[member]
            start, end = max(start, begin), min(end, stop)
            pool = [0] * len(row)
            pool[len(prefix) + start - begin:len(prefix) + end - begin] = [1] * (end - start)
            pools.append(pool)
        windows.append(ChunkWindow(row, members, pools))
    return windows


def situated_rows(prompt_tokenizer: PromptTokenizer, texts: Sequence[str],
                  instructions: str | Sequence[str | None] | None, max_length: int, kind: str,
                  spans: Sequence[Span | None]) -> list[tuple[list[int], list[int]]]:
    """(ids, pool mask) per text for `Embedder.tokenize(spans=...)`: a text with a span is a situated chunk (its
    window of `max_length` tokens around the span, only the span's tokens pooled); one without is a plain row."""
    if len(spans) != len(texts):
        raise ValueError(f"{len(spans)} spans for {len(texts)} texts")
    per_text = list(instructions) if isinstance(instructions, (list, tuple)) else [instructions] * len(texts)
    plain = [index for index, span in enumerate(spans) if span is None]
    rows: list = [None] * len(texts)
    try:
        for index, row in zip(plain, prompt_tokenizer.rows([texts[i] for i in plain], [per_text[i] for i in plain],
                                                           max_length, kind)):
            rows[index] = (row.ids, row.pool)
    except UnembeddableText as exc:  # name the caller's row, not its place among the plain ones
        raise UnembeddableText(plain[exc.index], exc.detail) from None
    for index, span in enumerate(spans):
        if span is not None:  # a situated row: its window is tokenized once, by the chunker
            [window] = chunk_windows(prompt_tokenizer, texts[index], [span], per_text[index], kind, max_length, index)
            rows[index] = (window.ids, window.pools[0])
    return rows
