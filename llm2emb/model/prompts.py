"""Instruction templates, the text template around every text, and which tokens of a prompt are pooled.

Instructions steer an embedder (E5, NV-Embed) but must not be part of the vector: the pool mask marks
only the tokens of the text itself (and an appended EOS), so the instruction tokens shape the text's
hidden states through attention yet never enter the pooled vector.

The text template wraps every text, query or document, with or without an instruction: for an instruct base, its
chat template's user turn (`text_template_for("chat", tokenizer)`), which is how sentence-transformers 6 feeds any
model whose tokenizer has a chat template. Its tokens are context, never pooled, like an instruction's. On
SmolLM2-135M they move the first text token off the position the base parks its attention on, and the text reads as
the base's training did (benchmarks/RESULTS.md, "The chat template").
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


def wrap(before: str, after: str, prompt: Prompt) -> Prompt:
    """`prompt` between a text template's two sides (split_text_template), text span moved along."""
    return Prompt(before + prompt.string + after, len(before) + prompt.text_start, len(before) + prompt.text_end)


def split_text_template(template: str) -> tuple[str, str]:
    """What a text template puts before and after the text; a UserError unless it holds `{text}` once and no
    `{instruction}` (instructions have the query template)."""
    if template.count("{text}") != 1 or "{instruction}" in template:
        raise UserError(f"text template {template!r} must hold {{text}} exactly once and no {{instruction}}")
    before, after = template.split("{text}")
    return before, after


DEFAULT_TEXT_TEMPLATE = "bos"
"""What a conversion with the causal sink wraps texts in unless told (`--text-template`), where the base's tokenizer
has a token to lead with (default_text_template); benchmarks/RESULTS.md, "Robust defaults", says why."""

CHAT_SENTINEL = "\x00llm2emb-text\x00"


def text_template_for(choice: str, tokenizer) -> str:
    """The text template a conversion asks for: `chat` (the tokenizer's chat template around one user message, as
    sentence-transformers renders it), `turn` (that user turn alone, without the system turn some templates add:
    the same wrap in fewer tokens), `bos` (one leading token, lead_token), `none` (the text alone), or a literal
    template with `{text}`."""
    if choice == "none":
        return "{text}"
    if choice == "bos":
        lead = lead_token(tokenizer)
        if lead is None:
            raise UserError("text template bos: the base's tokenizer has no BOS token and no chat template that opens "
                            "with a special token (convert with --text-template none, or model.text_template: none)")
        return lead + "{text}"
    if choice not in ("chat", "turn"):
        split_text_template(choice)
        return choice
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"text template {choice}: the base's tokenizer has no chat template (use none, or give a "
                        "template)")
    rendered = rendered_user_turn(tokenizer)
    if rendered is None:
        raise UserError(f"text template {choice}: the base's chat template cannot render one user message")
    if rendered.count(CHAT_SENTINEL) != 1:
        raise UserError(f"text template {choice}: the base's chat template does not keep the user message whole")
    before, after = rendered.split(CHAT_SENTINEL)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos) and writes_bos(tokenizer):
        before = before[len(bos):]  # the tokenizer adds its BOS itself: one, not two
    if choice == "turn":
        before = user_turn(before, after, tokenizer)
    template = before + "{text}" + after
    split_text_template(template)
    return template


def default_text_template(tokenizer, causal_sink: bool) -> str:
    """DEFAULT_TEXT_TEMPLATE for a base with the causal sink, whose first position the lead token takes (a UserError
    where the tokenizer has none to give: not silently another recipe); the text alone without the sink, as a
    plain-mask folder is made to be served by sentence-transformers, vLLM or TEI, which would pool the lead token."""
    return text_template_for(DEFAULT_TEXT_TEMPLATE, tokenizer) if causal_sink else "{text}"


def writes_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of every text itself (Llama, Mistral; not SmolLM2)."""
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def lead_token(tokenizer) -> str | None:
    """The one token `bos` puts before every text, so that the causal sink (the first position, which attends only to
    itself) is a token that is never pooled rather than the text's first word: the tokenizer's BOS; nothing when the
    tokenizer adds its BOS itself (Llama, Mistral: special tokens are never pooled); for a tokenizer without a BOS
    (Qwen), the first special token its chat template opens with (`<|im_start|>`); None where there is neither."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos:
        return "" if writes_bos(tokenizer) else bos
    if getattr(tokenizer, "chat_template", None):
        rendered = rendered_user_turn(tokenizer) or ""
        return next((token for token in special_tokens(tokenizer) if rendered.startswith(token)), None)
    return None


def rendered_user_turn(tokenizer) -> str | None:
    """The chat template around one user message (CHAT_SENTINEL); None where the template cannot render one (a
    user's Jinja may raise anything), so each caller says what that means for it."""
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": CHAT_SENTINEL}], tokenize=False)
    except Exception:
        return None


def special_tokens(tokenizer) -> list[str]:
    """Every special token of `tokenizer`, the longest first (so a prefix match takes the whole token)."""
    return sorted(set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                       if t.special}, key=len, reverse=True)


def user_turn(before: str, after: str, tokenizer) -> str:
    """`before` from where the user turn starts: after the last end-of-turn marker (the first special token that
    closes the user's message) that an earlier turn, a default system prompt, ended with; all of it when none did."""
    closing = next((token for token in special_tokens(tokenizer) if after.lstrip().startswith(token)), None)
    if closing is None or closing not in before:
        return before
    return before[before.rindex(closing) + len(closing):].lstrip()


@dataclass(frozen=True)
class Prompts:
    """The query, document and text templates of one model folder (default instructions are the caller's)."""

    query_template: str
    document_template: str = "{text}"
    text_template: str = "{text}"

    def __post_init__(self) -> None:  # checked and split once, not per text
        object.__setattr__(self, "sides", split_text_template(self.text_template))

    def query(self, text: str, instruction: str | None = None) -> Prompt:
        return wrap(*self.sides, render(self.query_template, text, instruction))

    def document(self, text: str, instruction: str | None = None) -> Prompt:
        return wrap(*self.sides, render(self.document_template, text, instruction))
