"""Evaluation results: one record per task, a table for the screen and JSON for machines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm2emb.files import write_text_atomic


@dataclass
class TaskResult:
    """Scores of one model on one task (all x100), with what was evaluated and how long it took."""

    task: str
    kind: str
    """`sts` or `retrieval`."""
    main_score: str
    scores: dict[str, float]
    examples: int
    """Sentence pairs (STS) or evaluated queries (retrieval)."""
    seconds: float
    documents: int | None = None
    corpus_cached: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> float:
        return self.scores[self.main_score]

    @property
    def warning(self) -> str | None:
        """A line for the user about the vectors behind the scores (degenerate ones: llm2emb.model.spread), if any."""
        return self.extra.get("warning")


def format_table(results: list[TaskResult]) -> str:
    """A fixed-width table: task, main metric, every score, size and wall time."""
    rows = [("task", "main", "scores", "n", "time")]
    for r in results:
        scores = "  ".join(f"{name} {value:.2f}" for name, value in r.scores.items())
        size = f"{r.examples}" if r.documents is None else f"{r.examples}q/{r.documents}d"
        cached = " (corpus cached)" if r.corpus_cached else ""
        rows.append((r.task, f"{r.main_score} {r.main:.2f}", scores, size, f"{r.seconds:.1f}s{cached}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(results: list[TaskResult], **metadata: Any) -> dict[str, Any]:
    return {**metadata, "results": [asdict(r) for r in results]}


def write_json(path: str | Path, results: list[TaskResult], **metadata: Any) -> Path:
    return write_text_atomic(path, json.dumps(to_json(results, **metadata), indent=2) + "\n")
