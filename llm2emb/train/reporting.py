"""What a finished run reports: the summary (steps, speed, peak memory) and the loss plot."""

from __future__ import annotations

import json
import logging
import math
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm2emb.files import atomic_path

logger = logging.getLogger(__name__)


METRICS_NAME = "metrics.jsonl"


SUMMARY_NAME = "summary.json"


@dataclass
class TrainSummary:
    """What a finished run reports: where the model is, and how fast and how big the run was."""

    output_dir: str
    model_dir: str
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    peak_memory_mb: float = 0.0
    stages: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second,
                "samples_per_second": self.samples_per_second}

    def format(self) -> str:
        return (f"trained {self.steps} steps in {self.seconds:.0f}s: {self.samples_per_second:.1f} samples/s, "
                f"{self.tokens_per_second:.0f} tokens/s, peak memory {self.peak_memory_mb:.0f} MiB -> {self.model_dir}")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def plot_loss(metrics: Path, target: Path) -> Path | None:
    """The loss curve of every stage (matplotlib is optional: without it, no picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve (pip install 'llm2emb[plot]')")
        return None
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        if "loss" in record and math.isfinite(record["loss"]):
            curves.setdefault(record["stage"], {})[record["step"]] = record["loss"]  # a resumed step replaces
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage, points in curves.items():
        steps = sorted(points)
        axis.plot([offset + s for s in steps], [points[s] for s in steps], label=stage)
        offset += steps[-1]
    axis.set_xlabel("optimizer step (all stages)")
    axis.set_ylabel("contrastive loss")
    axis.legend()
    figure.tight_layout()
    with atomic_path(target) as staging, staging.open("wb") as handle:
        figure.savefig(handle, dpi=100, format="png")
    plt.close(figure)
    return target
