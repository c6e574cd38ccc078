"""Cost of one very long input line: `llm2emb encode` peak memory and time for a line of N characters.

Issue 30: one 10 MB line took 23 s and 3.7 GB to give one vector of 512 tokens, since the whole text was tokenized
before it was cut. Each size runs `llm2emb encode` in a process of its own (its peak RSS is its own), on one line of
SNLI words; the first size is a normal line, the reference. Prints a table and writes JSON.

    python -m scripts.bench_long_line --model runs/q/smol-bi --sizes 200 1000000 10000000 --json benchmarks/long_line.json
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1_000_000, 10_000_000])
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            source = Path(tmp) / f"{size}.txt"
            source.write_text(line_of(size) + "\n")
            done = subprocess.run([sys.executable, "-c", CHILD, args.model, str(source), str(Path(tmp) / f"{size}.npy")],
                                  capture_output=True, text=True, check=True)
            code, seconds, peak = done.stdout.split()[-3:]
            rows.append({"characters": size, "exit": int(code), "seconds": round(float(seconds), 2),
                         "peak_rss_mb": round(float(peak), 1)})
    base = rows[0]
    print("| line (characters) | exit | encode s (load included) | peak RSS MiB | RSS above the first line |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['characters']:,} | {row['exit']} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} "
              f"| {row['peak_rss_mb'] - base['peak_rss_mb']:+.0f} |")
    if args.json:
        from llm2emb.evaluate.runner import environment

        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows, "environment": environment()},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
