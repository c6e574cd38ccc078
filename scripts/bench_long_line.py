"""Cost of one very long input line: `llm2emb encode` peak memory and time for a line of N characters.

Issue 30: one 10 MB line took 23 s and 3.7 GB to give one vector of 512 tokens, since the whole text was tokenized
before it was cut. Each size runs `llm2emb encode` in a process of its own (its peak RSS is its own), on one line of
SNLI words; the first size is a normal line, the reference. Prints a table and writes JSON.

    python -m scripts.bench_long_line --model runs/q/smol-bi --sizes 200 1000000 10000000 --json benchmarks/long_line.json
    python -m scripts.bench_long_line --report benchmarks/long_line_before.json benchmarks/long_line.json \
        --results-block long-line

`--report` renders the table from saved JSON files (one per llm2emb version measured), `--results-block` puts it in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHILD = """
import resource, sys, time
from llm2emb.cli import main
started = time.perf_counter()
code = main(["encode", sys.argv[1], "--input", sys.argv[2], "--output", sys.argv[3], "--quiet"])
print(code, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def line_of(characters: int, seed: int = 0) -> str:
    words = (DATA / "snli" / "triplets.jsonl").read_text().split()
    pick = random.Random(seed).choice
    parts, length = [], 0
    while length < characters:
        word = pick(words)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:characters]


def table(reports: list[dict]) -> str:
    lines = ["| llm2emb commit | line (characters) | exit | encode s (load included) | peak RSS MiB | RSS above the "
             "first line |", "|---|---|---|---|---|---|"]
    for report in reports:
        base = report["rows"][0]
        for row in report["rows"]:
            lines.append(f"| {report.get('commit', '-')} | {row['characters']:,} | {row['exit']} | {row['seconds']:.2f} "
                         f"| {row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] - base['peak_rss_mb']:+.0f} |")
    env = reports[-1]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines += ["", f"Machine: {env['cpu']} ({env['cpu_count']} cores), one torch thread per run; {versions}; "
              f"measured {', '.join(r['environment']['date'] for r in reports)}."]
    return "\n".join(lines)


def measure(model: str, sizes: list[int]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            source = Path(tmp) / f"{size}.txt"
            source.write_text(line_of(size) + "\n")
            done = subprocess.run([sys.executable, "-c", CHILD, model, str(source), str(Path(tmp) / f"{size}.npy")],
                                  capture_output=True, text=True, check=True)
            code, seconds, peak = done.stdout.split()[-3:]
            rows.append({"characters": size, "exit": int(code), "seconds": round(float(seconds), 2),
                         "peak_rss_mb": round(float(peak), 1)})
    from llm2emb.evaluate.runner import environment

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"model": model, "commit": commit.strip(), "rows": rows, "environment": environment()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1_000_000, 10_000_000])
    p.add_argument("--json", help="save the measurement here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="render saved measurements; measure nothing")
    p.add_argument("--results-block", metavar="NAME")
    args = p.parse_args(argv)
    if args.report:
        reports = [json.loads(Path(path).read_text()) for path in args.report]
    else:
        if not args.model:
            p.error("--model is required unless --report is given")
        reports = [measure(args.model, args.sizes)]
        if args.json:
            Path(args.json).write_text(json.dumps(reports[0], indent=2) + "\n")
    from scripts.results_block import publish

    publish(table(reports), args.results_block)


if __name__ == "__main__":
    main()
