"""Worst, median and best run of each system at each training budget, one panel per score: the picture of issue 29's
criterion (a default's worst run against the baseline's median run, at every budget), drawn from the committed
result rows of compare_recipes (one JSON object per run; its `steps` and `batch_size` give the budget).

    python -m scripts.budget_plot --rows benchmarks/robust_20x16.jsonl benchmarks/grid_20x16.jsonl \
        benchmarks/robust_51x32.jsonl --systems st st-lr8e4w1 sink --out benchmarks/robust_budgets.png
"""

from __future__ import annotations

import argparse

import numpy as np

from scripts.compare_recipes import TASKS, is_st, read_rows


def spreads(rows: list[dict], systems: list[str]) -> dict[str, dict[str, dict[str, tuple[float, float, float]]]]:
    """task -> system -> budget ("steps x batch") -> (worst, median, best) over that system's runs, one row per
    (system, seed, row order) even when several files hold it."""
    unique = {(r["system"], r["seed"], r.get("row_seed"), r["steps"], r["batch_size"]): r for r in rows}
    found: dict = {}
    for task in TASKS:
        for system in systems:
            for (name, _, _, steps, batch), row in unique.items():
                if name == system and task in row:
                    found.setdefault(task, {}).setdefault(system, {}).setdefault(f"{steps} x {batch}", []).append(
                        row[task])
    return {task: {system: {budget: (min(v), float(np.median(v)), max(v)) for budget, v in budgets.items()}
                   for system, budgets in by_system.items()} for task, by_system in found.items()}


def plot(found: dict, systems: list[str], target: str) -> None:
    """One colour per system in every panel, so a system reads alike across scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(found), figsize=(5 * len(found), 4), squeeze=False)
    for axis, (task, by_system) in zip(axes[0], found.items()):
        budgets = sorted({b for budgets in by_system.values() for b in budgets},
                         key=lambda b: int(b.split(" x ")[0]) * int(b.split(" x ")[1]))
        width = 0.8 / max(len(by_system), 1)
        for index, (system, values) in enumerate(by_system.items()):
            xs = [budgets.index(b) + (index - (len(by_system) - 1) / 2) * width for b in values]
            worst, median, best = (np.array([values[b][i] for b in values]) for i in range(3))
            axis.errorbar(xs, median, yerr=[median - worst, best - median], fmt="s" if is_st(system) else "o",
                          capsize=3, label=system, color=f"C{systems.index(system) % 10}")
        axis.set_xticks(range(len(budgets)), budgets)
        axis.set_xlabel("budget (steps x batch)")
        axis.set_ylabel(f"{TASKS[task]} x100 (worst, median, best)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(target, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", required=True, help="compare_recipes result rows (JSONL)")
    p.add_argument("--systems", nargs="+", required=True)
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    found = spreads(read_rows(args.rows), args.systems)
    for task, by_system in found.items():
        for system, budgets in by_system.items():
            print(task, system, {b: tuple(round(x, 2) for x in v) for b, v in budgets.items()})
    plot(found, args.systems, args.out)


if __name__ == "__main__":
    main()
