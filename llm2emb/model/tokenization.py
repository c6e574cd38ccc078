"""Prompts to token ids under `max_length`, with one truncation rule: the text is cut, never the prompt.

`max_length` bounds the whole tokenized prompt: special tokens, the template and instruction around the text, the
text itself and the EOS that last-token pooling appends. When a prompt is longer, only the text loses tokens, from
its end; the template's parts before and after the text stay whole. A prompt whose template, instruction and
special tokens alone leave the text no token is refused (`UnembeddableText`) rather than pooled into a zero vector.

This is the rule sentence-transformers applies to a prompt with a text at its end (it truncates the prompt string
from the right), so an exported folder gives the same vectors as `Embedder` for the same `max_length`.

A text far longer than `max_length` is cut before it is tokenized, so that one 10 MB line costs what a text of
`max_length` tokens costs (issue 30: tokenizing it whole took 23 s and 3.7 GB to keep 512 tokens). No token covers
more than `longest_token` characters, so the first `limit` tokens of any text lie within its first `limit x
longest_token` characters; the text is cut at the first whitespace after `(limit + 8) x longest_token` characters.
With a pre-tokenizer that splits at whitespace (the byte-level BPE of Qwen, Llama 3, SmolLM2, GPT-2), tokens never
cross the cut and every token before it is the one full tokenization gives. For any tokenizer the cut is checked:
the prompt is also tokenized with the text cut at twice that bound, and unless both keep the same ids the text is
tokenized whole. A cut text's `cut` count is then a lower bound (at least 1), not the exact number of tokens lost.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from llm2emb.errors import UserError
from llm2emb.model.prompts import Prompt, Prompts

TOKENIZE_CHUNK = 1024
"""Prompts handed to the (Rust, multi-threaded) tokenizer at once: fast, and memory stays bounded for corpora."""
CUT_MARGIN = 8
"""Tokens of slack past `limit` in the pre-tokenization cut (see the module docstring)."""
WHITESPACE = re.compile(r"\s")


class UnembeddableText(UserError):
    """A text that would keep no token of its own (empty, or crowded out by its prompt): it has no vector.

    `index` is the text's position in the call; callers that know where it came from (an input line, a dataset row,
    a corpus id) re-raise with `detail` behind that location.
    """

    def __init__(self, index: int, detail: str):
        self.index, self.detail = index, detail
        super().__init__(f"text {index}: {detail}")


def no_room_detail(prompt_tokens: int, max_length: int) -> str:
    return (f"the prompt around the text (template, instruction, special tokens) takes {prompt_tokens} tokens of "
            f"max_length {max_length}, leaving the text none; shorten the instruction or raise max_length")


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt's ids and pool mask (1 on the text's own tokens and an appended EOS), and the text tokens cut."""

    ids: list[int]
    pool: list[int]
    cut: int


@dataclass(frozen=True)
class LocatedText:
    """A prompt tokenized whole: its text's tokens are ids[first:last + 1]; the text starts at character
    `text_start` of the prompt, the frame of `offsets`."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    first: int
    last: int
    text_start: int


def _text_positions(prompt: Prompt, offsets, special) -> list[int]:
    """Positions of the non-special tokens that overlap the prompt's text."""
    return [i for i, ((begin, end), is_special) in enumerate(zip(offsets, special))
            if not is_special and end > prompt.text_start and begin < prompt.text_end]


@dataclass(frozen=True)
class PromptTokenizer:
    """Renders texts through a folder's templates and tokenizes them under the truncation rule above."""

    tokenizer: object
    prompts: Prompts
    append_eos: bool
    max_length: int

    def rows(
        self,
        texts: Sequence[str],
        instructions: str | Sequence[str | None] | None = None,
        max_length: int | None = None,
        kind: str = "query",
    ) -> Iterator[TokenizedPrompt]:
        """One `TokenizedPrompt` per text, in order; `UnembeddableText` names the index of a text left no token."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(texts)
        if len(instructions) != len(texts):
            raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
        render = self.prompts.query if kind == "query" else self.prompts.document
        limit = max_length or self.max_length
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = [render(self.bounded(text, instruction, limit, render), instruction) for text, instruction in
                     zip(texts[start:start + TOKENIZE_CHUNK], instructions[start:start + TOKENIZE_CHUNK])]
            encoded = self.tokenizer(
                [prompt.string for prompt in chunk],
                add_special_tokens=True,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                verbose=False,  # a prompt over the model's length is cut below, by this module's rule
            )
            for offset, prompt in enumerate(chunk):
                yield self._fit(prompt, encoded["input_ids"][offset], encoded["offset_mapping"][offset],
                                encoded["special_tokens_mask"][offset], limit, start + offset)

    @property
    def longest_token(self) -> int:
        """Characters of the longest token in the vocabulary (added tokens too): no token covers more text."""
        return longest_token(self.tokenizer)

    def cut_point(self, text: str, limit: int) -> int | None:
        """Where to cut `text` so that its first `limit` tokens stay whole, or None when it is short enough."""
        if len(text) <= limit + CUT_MARGIN:  # every token covers a character at least: nothing to cut
            return None
        bound = (limit + CUT_MARGIN) * self.longest_token
        if len(text) <= bound:
            return None
        space = WHITESPACE.search(text, bound)
        return space.start() if space else bound

    def bounded(self, text: str, instruction: str | None, limit: int, render) -> str:
        """`text`, cut before tokenization when it is far longer than `limit` tokens can cover, where the cut is
        checked to leave the kept ids as they are (module docstring); else whole."""
        first = self.cut_point(text, limit)
        second = self.cut_point(text, 2 * limit + CUT_MARGIN) if first is not None else None
        if second is None:
            return text  # short enough to tokenize whole, or the check would read it all anyway
        kept = [self.text_ids(render(text[:end], instruction))[:limit] for end in (first, second)]
        return text[:first] if kept[0] == kept[1] else text

    def text_ids(self, prompt: Prompt) -> list[int]:
        """The ids of a prompt's text tokens (template and special tokens left out)."""
        encoded = self.tokenizer(prompt.string, add_special_tokens=True, return_offsets_mapping=True,
                                 return_special_tokens_mask=True, verbose=False)
        positions = _text_positions(prompt, encoded["offset_mapping"], encoded["special_tokens_mask"])
        return [encoded["input_ids"][i] for i in positions]

    def _fit(self, prompt: Prompt, ids, offsets, special, limit: int, index: int) -> TokenizedPrompt:
        text_positions = _text_positions(prompt, offsets, special)
        budget = limit - int(self.append_eos)
        if not text_positions:
            raise UnembeddableText(index, "the text is empty (no token to embed)")
        first, last = text_positions[0], text_positions[-1]
        text_tokens = last - first + 1
        around = len(ids) - text_tokens
        keep = min(text_tokens, budget - around)
        if keep < 1:
            raise UnembeddableText(index, no_room_detail(around + int(self.append_eos), limit))
        kept_ids = list(ids[:first + keep]) + list(ids[last + 1:])
        pool = [0] * first + [1] * keep + [0] * (len(ids) - last - 1)
        if self.append_eos:
            kept_ids.append(self.tokenizer.eos_token_id)
            pool.append(1)
        return TokenizedPrompt(kept_ids, pool, text_tokens - keep)

    def locate_text(self, text: str, instruction: str | None = None, kind: str = "query") -> LocatedText | None:
        """The whole prompt's ids and offsets, uncut, and where its text's tokens are; None if the text has none."""
        render = self.prompts.query if kind == "query" else self.prompts.document
        prompt = render(text, instruction)
        encoded = self.tokenizer(prompt.string, add_special_tokens=True, return_offsets_mapping=True,
                                 return_special_tokens_mask=True, verbose=False)
        positions = _text_positions(prompt, encoded["offset_mapping"], encoded["special_tokens_mask"])
        if not positions:
            return None
        return LocatedText(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]],
                           positions[0], positions[-1], prompt.text_start)

    def prompt_tokens(self, instruction: str | None, kind: str = "query") -> int:
        """Tokens the prompt takes besides its text (template, instruction, special tokens, appended EOS).

        Measured around a one-character text, so a separator that a text's first word absorbs (the space in
        "Query: word") counts: an upper bound, exact or one over.
        """
        render = self.prompts.query if kind == "query" else self.prompts.document
        prompt = render("x", instruction)
        encoded = self.tokenizer(prompt.string, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        outside = sum(1 for begin, end in encoded["offset_mapping"] if end <= prompt.text_start or begin >= prompt.text_end)
        return outside + int(self.append_eos)


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token(tokenizer) -> int:
    """The longest token's characters, computed once per tokenizer (an Embedder makes a PromptTokenizer per call)."""
    if tokenizer not in _LONGEST:
        _LONGEST[tokenizer] = max(len(token) for token in tokenizer.get_vocab())
    return _LONGEST[tokenizer]


@contextlib.contextmanager
def locate_texts(describe: Callable[[int], str]) -> Iterator[None]:
    """Re-raise `UnembeddableText` as one line that says where the text came from (`describe(index)`: an input
    line, a dataset row, a corpus document id), since the text's index in one call means nothing to a user."""
    try:
        yield
    except UnembeddableText as exc:
        raise UserError(f"{describe(exc.index)}: {exc.detail}") from None


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, left: bool) -> dict[str, np.ndarray]:
    """(ids, pool) rows as one batch: int64 `input_ids`, `attention_mask` and `pool_mask` (rows, longest), padded on
    the left or the right; the one padding rule of the torch path (Embedder) and the ONNX one (OnnxEncoder)."""
    width = max(len(ids) for ids, _ in rows)
    batch = {name: np.zeros((len(rows), width), dtype=np.int64) for name in ("input_ids", "attention_mask", "pool_mask")}
    batch["input_ids"].fill(pad_id)
    for i, (ids, pool) in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        batch["input_ids"][i, span] = ids
        batch["attention_mask"][i, span] = 1
        batch["pool_mask"][i, span] = pool
    return batch
