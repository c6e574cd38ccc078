"""Compressed embeddings: float16, int8/uint8 scalar quantization and binary codes, and search over them.

Storage per vector of dim d: float32 4d bytes, float16 2d, int8/uint8 d, binary/ubinary d/8 (packed bits).

- int8 / uint8: each dimension is mapped linearly from its calibrated range [min, max] onto 256 levels (rounded to
  the nearest level and clipped, where sentence-transformers' `quantize_embeddings` truncates). The ranges come from a
  sample of float embeddings (`calibration_ranges`) and must be the same for queries and documents; a `(2, d)` array
  of [min, max] rows is itself a valid sample, so saved ranges calibrate again to themselves.
- binary / ubinary: one bit per dimension (positive or not), packed 8 to a byte (`np.packbits`); binary stores the
  bytes shifted to int8 as sentence-transformers does. Hamming distance ranks them; `rescore` retrieves that many
  times more candidates by Hamming and re-ranks them by the float query against the documents' signs (the
  binary-then-rescore recipe).

Search over codes is `evaluate.search.search_codes`: it dequantizes (integers back to their level's value, bits to
+-1) and runs the exact chunked search; for bits the dot product of +-1 vectors is d - 2 x Hamming, the same order.
"""

from __future__ import annotations

import numpy as np

from llm2emb.errors import UserError

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
LEVELS = 255


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def needs_ranges(precision: str) -> bool:
    return precision in ("int8", "uint8")


def calibration_ranges(sample: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] (shape (2, d), float32) of a sample of float embeddings (rows)."""
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) < 2:
        raise UserError(f"a calibration sample needs at least two embeddings (rows), got shape {sample.shape}")
    return np.stack([sample.min(axis=0), sample.max(axis=0)]).astype(np.float32)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Codes of float embeddings (rows) at `precision`; int8/uint8 need `ranges` from `calibration_ranges`."""
    check_precision(precision)
    vectors = np.asarray(vectors, dtype=np.float32)
    if precision == "float32":
        return vectors
    if precision == "float16":
        return vectors.astype(np.float16)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    starts, steps = _levels(ranges, vectors.shape[-1], precision)
    codes = np.clip(np.rint((vectors - starts) / steps), 0, LEVELS).astype(np.int16)
    return (codes - 128).astype(np.int8) if precision == "int8" else codes.astype(np.uint8)


def dequantize(codes: np.ndarray, precision: str, ranges: np.ndarray | None = None, dim: int | None = None) -> np.ndarray:
    """float32 vectors the codes stand for: each level's value, or +-1 per bit (`dim` trims the packing's padding)."""
    check_precision(precision)
    if precision in ("float32", "float16"):
        return np.asarray(codes, dtype=np.float32)
    if precision in ("binary", "ubinary"):
        packed = codes.astype(np.int16) + 128 if precision == "binary" else codes
        bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1)[..., :dim]
        return bits.astype(np.float32) * 2 - 1
    starts, steps = _levels(ranges, codes.shape[-1], precision)
    levels = codes.astype(np.float32) + (128 if precision == "int8" else 0)
    return starts + levels * steps


def _levels(ranges: np.ndarray | None, dim: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    if ranges is None:
        raise UserError(f"precision {precision} needs calibration ranges (per-dimension min and max of a sample)")
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, dim):
        raise UserError(f"calibration ranges of shape {ranges.shape} do not fit embeddings of dim {dim}")
    steps = (ranges[1] - ranges[0]) / LEVELS
    return ranges[0], np.where(steps > 0, steps, 1.0).astype(np.float32)


def bytes_per_vector(precision: str, dim: int) -> int:
    check_precision(precision)
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim, "uint8": dim}.get(precision, -(-dim // 8))
