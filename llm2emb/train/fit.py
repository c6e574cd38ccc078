"""Do a stage's prompts leave room for their texts under `max_length`? Checked before the first step, reported by
`llm2emb train --check`.

The truncation rule (llm2emb.model.tokenization) cuts texts, never prompts, so the one way a row can lose its text is an
instruction (plus template and special tokens) of `max_length` tokens or more. That is refused here, naming the first
row that has such an instruction, before any training step: otherwise the pool mask would be empty and the run would
train on zero vectors at a constant loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm2emb.errors import UserError
from llm2emb.model.tokenization import PromptTokenizer, locate_texts, no_room_detail
from llm2emb.train.data import StageData
from llm2emb.train.recipe import StageSpec
from llm2emb.train.recipe_file import format_key_path

TOKENIZED_OBJECTIVES = ("contrastive", "simcse")
"""Objectives whose batches go through the prompt templates (MNTP tokenizes raw text its own way)."""


@dataclass
class DatasetFit:
    """How one dataset's prompts fit: the longest prompt without its text, and (when counted) the rows truncated."""

    key: str
    prompt_tokens: int
    max_length: int
    rows: int
    truncated_rows: int | None = None

    def format(self) -> str:
        line = f"prompt {self.prompt_tokens} tokens of max_length {self.max_length}"
        if self.truncated_rows is not None:
            line += f", {self.truncated_rows} of {self.rows} rows truncated"
        return line


def check_fit(
    stage: StageSpec, index: int, data: StageData, tokenizer: PromptTokenizer, max_length: int,
    count_truncated: bool = False,
) -> list[DatasetFit]:
    """Refuse a dataset whose prompt leaves its texts no token; with `count_truncated`, tokenize every row and count
    the rows that lose text tokens to `max_length` (slower: for `--check`)."""
    if stage.objective not in TOKENIZED_OBJECTIVES:
        return []
    fits = []
    for position, part in enumerate(data.parts):
        key = format_key_path(("stages", index, "datasets", position))
        instructions = [row or part.spec.instruction for row in list(part.rows["instruction"])]
        first_row = {instruction: row for row, instruction in reversed(list(enumerate(instructions)))}
        longest = tokenizer.prompt_tokens(None, "document")
        if longest >= max_length:
            raise UserError(f"{key}: {part.where(0)}: document {no_room_detail(longest, max_length)}")
        for instruction, row in first_row.items():
            tokens = tokenizer.prompt_tokens(instruction, "query")
            if tokens >= max_length:
                raise UserError(f"{key}: {part.where(row)}: query {no_room_detail(tokens, max_length)}")
            longest = max(longest, tokens)
        fit = DatasetFit(key, longest, max_length, len(part.rows))
        if count_truncated:
            fit.truncated_rows = _truncated_rows(part, instructions, tokenizer, max_length, key)
        fits.append(fit)
    return fits


def _truncated_rows(part, instructions: list[str | None], tokenizer: PromptTokenizer, max_length: int, key: str) -> int:
    cut = [False] * len(part.rows)
    with locate_texts(lambda i: f"{key}: {part.where(i)}: query"):
        for row, tokenized in enumerate(tokenizer.rows(list(part.rows["query"]), instructions, max_length, "query")):
            cut[row] = tokenized.cut > 0
    documents = [(row, text) for row, (positive, negatives) in
                 enumerate(zip(part.rows["positive"], part.rows["negatives"])) for text in [positive, *negatives]]
    with locate_texts(lambda i: f"{key}: {part.where(documents[i][0])}: document"):
        for (row, _), tokenized in zip(documents, tokenizer.rows([t for _, t in documents], None, max_length, "document")):
            cut[row] = cut[row] or tokenized.cut > 0
    return sum(cut)
