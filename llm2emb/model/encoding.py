"""Inference with an Embedder: texts to vectors in length-sorted batches, situated chunks, token vectors, and the
output options they share (Matryoshka `dim`, normalisation, compressed precision).

`Embedder.encode`, `encode_chunks` and `encode_tokens` are these functions; they use only the Embedder's public
parts (its prompt tokenizer, `pad_batch`, `forward`, `hidden_states`), so batching lives here and the model in
llm2emb.model.embedder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from llm2emb.errors import UserError
from llm2emb.model.packing import token_budget_batches
from llm2emb.model.tokenization import UnembeddableText
from llm2emb.retrieval.precision import check_precision, needs_ranges, quantize

Embedder = torch.nn.Module
"""What these functions take: an `llm2emb.model.embedder.Embedder` (named here without importing it, which would be a cycle)."""

PROGRESS_BAR_MIN_TEXTS = 1000
"""`encode` shows a progress bar from this many texts on, unless told otherwise."""


@dataclass(frozen=True)
class DocumentChunks:
    """One document's chunks: their character spans and their vectors (one row per span)."""

    spans: list[tuple[int, int]]
    vectors: np.ndarray


@contextlib.contextmanager
def evaluating(embedder: Embedder) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then the mode the Embedder had: encoding during training restores it."""
    was_training = embedder.training
    embedder.eval()
    try:
        yield
    finally:
        embedder.train(was_training)


def check_output_options(embedder: Embedder, batch_size: int, dim: int | None, precision: str, ranges) -> None:
    """The options every encode function takes, checked before any work."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if dim is not None and not 0 < dim <= embedder.dim:
        raise UserError(f"dim must be between 1 and {embedder.dim}, got {dim}")
    check_precision(precision)
    if needs_ranges(precision) and ranges is None:
        raise UserError(f"precision {precision} needs calibration ranges (llm2emb.retrieval.precision.calibration_ranges)")


def finish_vectors(vectors: torch.Tensor, dim: int | None, normalize: bool, texts: Sequence[int]) -> np.ndarray:
    """Pooled vectors as encode returns them: truncated to `dim`, checked, normalised, numpy.

    A zero or non-finite row raises `UnembeddableText` naming its text (`texts[row]`): never a zero or NaN row.
    """
    if dim is not None:
        vectors = vectors[:, :dim]
    norms = vectors.norm(dim=-1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten().tolist()
    if bad:
        raise UnembeddableText(int(texts[bad[0]]), f"the model gave a vector of norm {norms[bad[0]].item()}")
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors.cpu().numpy()


@torch.inference_mode()
def encode_texts(
    embedder: Embedder,
    texts: Sequence[str],
    instruction: str | None = None,
    batch_size: int = 32,
    normalize: bool | None = None,
    dim: int | None = None,
    show_progress_bar: bool | None = None,
    kind: str = "query",
    max_tokens: int | None = None,
    layers: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "float32",
    ranges: np.ndarray | None = None,
) -> np.ndarray:
    """Embeddings (n, d) as float32 numpy, L2-normalised, in the order of `texts`.

    Texts are tokenized, sorted by token count (longest first) and grouped so each batch pads little:
    `batch_size` caps the rows of a batch and `max_tokens` (optional) its tokens — rows x longest text when
    padded, the sum of lengths when packed — so short texts travel in large batches and long ones in small.
    `dim` keeps the first `dim` components (Matryoshka truncation) before normalising; `layers` runs only the
    first `layers` transformer layers. `on_batch(texts, tokens)` is called after each batch (progress reports).
    `precision` (float16, int8/uint8 with calibration `ranges`, binary/ubinary) returns compressed codes
    (llm2emb.retrieval.precision).
    """
    check_output_options(embedder, batch_size, dim, precision, ranges)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    normalize = embedder.config.normalize if normalize is None else normalize
    if show_progress_bar is None:
        show_progress_bar = len(texts) >= PROGRESS_BAR_MIN_TEXTS
    # Every text is tokenized before sorting; numpy rows keep that at ~5 bytes a token for large corpora.
    rows = [(np.asarray(row.ids, np.int32), np.asarray(row.pool, np.int8))
            for row in embedder.prompt_tokenizer.rows(texts, instruction, None, kind)]
    lengths = [len(ids) for ids, _ in rows]
    order = np.argsort([-n for n in lengths], kind="stable")
    packed = embedder.attention_kernel != "padded"
    groups = list(token_budget_batches([lengths[i] for i in order], max_tokens, batch_size, packed,
                                       boundary=embedder.rope_window))
    result = np.zeros((len(texts), dim or embedder.dim), dtype=np.float32)
    with evaluating(embedder):
        for group in tqdm(groups, disable=not show_progress_bar, desc="encode", unit="batch"):
            index = order[group]
            try:
                vectors = embedder(embedder.pad_batch([rows[i] for i in index]), layers=layers).float()
            except UnembeddableText as exc:
                raise UnembeddableText(int(index[exc.index]), exc.detail) from None
            result[index] = finish_vectors(vectors, dim, normalize, index)
            if on_batch is not None:
                on_batch(len(index), int(sum(lengths[i] for i in index)))
    return quantize(result, precision, ranges)


@torch.inference_mode()
def encode_chunks(
    embedder: Embedder,
    documents: Sequence[str],
    spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    chunker: str | Callable[[str], list[tuple[int, int]]] = "sentences",
    window: int | None = None,
    instruction: str | None = None,
    kind: str = "document",
    batch_size: int = 8,
    normalize: bool | None = None,
    dim: int | None = None,
    show_progress_bar: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "float32",
    ranges: np.ndarray | None = None,
) -> list[DocumentChunks]:
    """Situated chunks (llm2emb.retrieval.chunking): each chunk of each document embedded in its document's context.

    `spans[i]` are character spans of `documents[i]`; without them `chunker` ("sentences", "words:N" or a
    callable text -> spans) makes them. Forwards are at most `window` tokens (default max_length). Returns one
    `DocumentChunks(spans, vectors)` per document, vectors (chunks, d) like `encode`'s. Documents get the
    folder's default document instruction unless `instruction` is given. `on_batch(chunks, tokens)` is called
    after each batch of forwards.
    """
    from llm2emb.retrieval.chunking import check_spans, chunk_windows, chunker_from_spec

    check_output_options(embedder, batch_size, dim, precision, ranges)
    if isinstance(documents, str):
        raise TypeError("documents must be a list of strings, not a single string")
    if spans is not None and len(spans) != len(documents):
        raise UserError(f"{len(spans)} span lists for {len(documents)} documents")
    if kind == "document":
        instruction = instruction or embedder.config.default_document_instruction
    normalize = embedder.config.normalize if normalize is None else normalize
    chunk = None if spans is not None else chunker_from_spec(chunker)
    plans, windows = [], []
    for number, text in enumerate(documents):
        own = check_spans(text, spans[number] if spans is not None else chunk(text), f"document {number}")
        plans.append(own)
        for piece in chunk_windows(embedder.prompt_tokenizer, text, own, instruction, kind, window, number):
            windows.append((number, piece))
    offsets = np.cumsum([0] + [len(own) for own in plans])
    result = np.zeros((int(offsets[-1]), dim or embedder.dim), dtype=np.float32)
    order = np.argsort([-len(piece.ids) for _, piece in windows], kind="stable")
    batches = list(token_budget_batches([len(windows[i][1].ids) for i in order], None, batch_size, packed=False,
                                        boundary=embedder.rope_window))
    if show_progress_bar is None:
        show_progress_bar = len(windows) >= PROGRESS_BAR_MIN_TEXTS
    with evaluating(embedder):
        for members in tqdm(batches, disable=not show_progress_bar, desc="encode", unit="batch"):
            group = [windows[i] for i in order[members]]
            batch = embedder.pad_batch([(piece.ids, piece.pools[0]) for _, piece in group])
            chunk_rows = [(row, number, member, pool) for row, (number, piece) in enumerate(group)
                          for member, pool in zip(piece.chunks, piece.pools)]
            # the same ids padded alike, so each chunk's pool mask lines up with its window's row
            batch["pool_mask"] = embedder.pad_batch([(group[row][1].ids, pool)
                                                     for row, _, _, pool in chunk_rows])["pool_mask"]
            batch["pool_rows"] = torch.tensor([row for row, _, _, _ in chunk_rows])
            targets = [int(offsets[number] + member) for _, number, member, _ in chunk_rows]
            vectors = embedder(batch).float()
            result[targets] = finish_vectors(vectors, dim, normalize, [number for _, number, _, _ in chunk_rows])
            if on_batch is not None:
                on_batch(len(chunk_rows), sum(len(piece.ids) for _, piece in group))
    coded = quantize(result, precision, ranges)
    return [DocumentChunks(own, coded[offsets[i]:offsets[i + 1]]) for i, own in enumerate(plans)]


@torch.inference_mode()
def encode_tokens(embedder: Embedder, texts: Sequence[str], instruction: str | None = None, kind: str = "query",
                  batch_size: int = 32, normalize: bool = True) -> list[np.ndarray]:
    """Token-level vectors for late interaction (Chamfer / MaxSim, MUVERA in llm2emb.retrieval.muvera): one array
    (tokens, width) per text, one row per token its vector pools (instructions left out). The width is the
    trained head's `token_dim` when the model has one (always normalised), else the hidden size: the last hidden
    states as they are."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    rows = [(row.ids, row.pool) for row in embedder.prompt_tokenizer.rows(texts, instruction, None, kind)]
    order = np.argsort([-len(ids) for ids, _ in rows], kind="stable")
    groups = token_budget_batches([len(rows[i][0]) for i in order], None, batch_size, packed=False,
                                  boundary=embedder.rope_window)
    result: list[np.ndarray] = [np.empty(0)] * len(rows)
    with evaluating(embedder):
        for group in groups:
            index = order[group]
            batch = embedder.pad_batch([rows[i] for i in index])
            hidden = embedder.hidden_states(batch)
            if embedder.token_head is not None:
                hidden = embedder.token_head(hidden)
            elif normalize:
                hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
            else:
                hidden = hidden.float()
            for row, text in enumerate(index):
                result[text] = hidden[row][batch["pool_mask"][row].bool().to(hidden.device)].cpu().numpy()
    return result
