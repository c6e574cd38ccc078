"""Instruction templates, and which tokens of a prompt are pooled.

Instructions steer an embedder (E5, NV-Embed) but must not be part of the vector: the pool mask marks
only the tokens of the text itself (and an appended EOS), so the instruction tokens shape the text's
hidden states through attention yet never enter the pooled vector.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm2emb.errors import UserError


@dataclass(frozen=True)
class Prompt:
    """A text rendered with its instruction; `text_start` is where the text's own characters begin."""

    string: str
    text_start: int
    text_end: int


def render(template: str, text: str, instruction: str | None) -> Prompt:
    """Fill `template` (`{instruction}`, `{text}`) and remember the span of the text inside it."""
    if "{text}" not in template:
        raise UserError(f"instruction template {template!r} has no {{text}} placeholder")
    if instruction is None:
        return Prompt(text, 0, len(text))
    before, after = template.split("{text}", 1)
    prefix = before.replace("{instruction}", instruction)
    suffix = after.replace("{instruction}", instruction)
    return Prompt(prefix + text + suffix, len(prefix), len(prefix) + len(text))


@dataclass(frozen=True)
class Prompts:
    """The query and document templates of one model folder (default instructions are the caller's)."""

    query_template: str
    document_template: str = "{text}"

    def query(self, text: str, instruction: str | None = None) -> Prompt:
        return render(self.query_template, text, instruction)

    def document(self, text: str, instruction: str | None = None) -> Prompt:
        return render(self.document_template, text, instruction)
