"""Benchmarks that run one condition at a time, each into its own JSON, so conditions can run side by side and an
interrupted series continues: the shared set-up of bench_chunks and bench_long."""

from __future__ import annotations

from pathlib import Path


def pending_conditions(out: str | Path, conditions: list[str], threads: int | None) -> tuple[Path, list[str]]:
    """The output folder (made), and the conditions whose `<out>/<condition>.json` is not there yet; sets torch's
    threads when `threads` is given (one each for two processes on two cores)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, [c for c in conditions if not (folder / f"{c}.json").is_file()]
