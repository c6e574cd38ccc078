"""Training throughput of a recipe: run each stage for N steps in a temporary folder, print samples/s, tokens/s
and peak memory per stage and overall.

Not a timed test: numbers depend on the machine, so they go into benchmarks/RESULTS.md with the command.
Evaluation, checkpoints and reporters are turned off so only training is timed; the first steps (allocation,
warm-up) are included, so use enough steps for a steady figure.

    python scripts/bench_recipe.py recipes/quickstart.yaml --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import torch

from llm2emb.errors import UserError
from llm2emb.train.recipe_file import load_recipe
from llm2emb.train.runner import run_recipe


def bench_overrides(stage_count: int, steps: int, output_dir: str) -> list[str]:
    """`--set` overrides that make a recipe a short, quiet benchmark writing into `output_dir`."""
    overrides = [f"output_dir={output_dir}", "eval.at_start=false", "eval.at_end=false", "eval.every_steps=null",
                 f"save_steps={10**9}", "report_to=[none]", "logging_steps=1"]
    for index in range(stage_count):
        overrides += [f"stages[{index}].max_steps={steps}", f"stages[{index}].warmup_steps=0"]
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage (default 10)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="further recipe overrides, applied first")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        stages = len(load_recipe(args.recipe, args.overrides).stages)
        with tempfile.TemporaryDirectory(prefix="llm2emb-bench-") as tmp:
            recipe = load_recipe(args.recipe, [*args.overrides, *bench_overrides(stages, args.steps, tmp)])
            summary = run_recipe(recipe)
    except UserError as exc:
        print(f"bench_recipe: error: {exc}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.recipe} on {device} ({platform.machine()}), torch {torch.__version__}")
    print(f"{'stage':<16}{'steps':>6}{'seconds':>9}{'samples/s':>11}{'tokens/s':>10}")
    for stage in summary.stages:
        print(f"{stage['name']:<16}{stage['steps']:>6}{stage['seconds']:>9.1f}"
              f"{stage['samples'] / stage['seconds']:>11.2f}{stage['tokens'] / stage['seconds']:>10.0f}")
    print(f"{'all':<16}{summary.steps:>6}{summary.seconds:>9.1f}"
          f"{summary.samples_per_second:>11.2f}{summary.tokens_per_second:>10.0f}")
    print(f"peak memory {summary.peak_memory_mb:.0f} MiB ({'GPU allocated' if torch.cuda.is_available() else 'RSS'})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"recipe": args.recipe, "device": device, **summary.to_dict()}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
