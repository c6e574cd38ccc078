"""Long context without retraining: passkey and needle accuracy against document length, per RoPE extension.

For each method (none, and pi / ntk / yarn at --factor) the model is loaded with that extension and scored on
LongEmbed's synthetic tasks generated at --lengths tokens (`llm2emb eval --long`; needles hidden in SciFact
abstracts). Within the trained window every method gives the untouched model's vectors (llm2emb.model.rope, tested), so
pi / ntk / yarn run only at the lengths that may reach beyond it and the table shows `none`'s score, marked `=`, in
their other cells: the CPU time goes where the methods differ. Each method writes `<out>/<method>.json` and is
skipped when that exists, so methods can run as separate processes side by side; a table is made from what is there:

    python -m scripts.bench_long runs/q/smol-bi --lengths 1024 4096 8192 12288 16384 --documents 20 \
        --methods none yarn --out runs/long --table benchmarks/long.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("none", "pi", "ntk", "yarn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="llm2emb model folder (a RoPE decoder)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--factor", type=float, default=4.0, help="window growth of pi / ntk / yarn")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096, 8192])
    p.add_argument("--documents", type=int, default=20, help="documents per task and length")
    p.add_argument("--tasks", nargs="+", default=["passkey", "needle"], choices=["passkey", "needle"])
    p.add_argument("--haystack", default=str(DATA / "scifact" / "corpus.jsonl"), help="prose for the needles")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights and states (default: the model's own)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", required=True)
    p.add_argument("--table", help="write the markdown table of every method found in --out here")
    return p.parse_args(argv)


def scores_of(path: Path) -> dict[str, float]:
    """`task@length` -> nDCG@1 of one method's JSON ({} when it is not there)."""
    if not path.is_file():
        return {}
    return {r["task"].split("/")[0]: r["scores"]["ndcg@1"] for r in json.loads(path.read_text())["results"]}


def table(out: Path, lengths: list[int], tasks: list[str]) -> str:
    header = "| method | " + " | ".join(f"{task} {length}" for task in tasks for length in lengths) + " |"
    lines = [header, "|---" * (1 + len(tasks) * len(lengths)) + "|"]
    untouched = scores_of(out / "none.json")
    for method in METHODS:
        if not (out / f"{method}.json").is_file():
            continue
        scores = scores_of(out / f"{method}.json")
        cells = []
        for key in (f"{task}@{length}" for task in tasks for length in lengths):
            if key in scores:
                cells.append(f"{scores[key]:.0f}")
            else:  # inside the window: the untouched model's vectors, not re-run
                cells.append(f"={untouched[key]:.0f}" if key in untouched and method != "none" else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trained_window(model: str) -> int:
    """From the folder's config.json alone (an llm2emb folder keeps its base's config there): no weights loaded."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).max_position_embeddings


def main(argv=None) -> None:
    args = parse_args(argv)

    from llm2emb.evaluate.results import write_json
    from llm2emb.evaluate.runner import LONG_PROMPT_ROOM, run_eval
    from scripts.conditions import pending_conditions

    out, pending = pending_conditions(args.out, args.methods, args.threads)
    window = trained_window(args.model) if set(pending) - {"none"} else None
    for method in pending:
        path = out / f"{method}.json"
        lengths = args.lengths if method == "none" else [n for n in args.lengths if n + LONG_PROMPT_ROOM > window]
        if not lengths:
            print(f"{method}: every length fits the {window}-token window (identical to none); skipped")
            continue
        started = time.perf_counter()
        report = run_eval(args.model, long_tasks=args.tasks, long_lengths=lengths, long_documents=args.documents,
                          haystack=args.haystack, rope_scaling=None if method == "none" else f"{method}:{args.factor}",
                          batch_size=args.batch_size, use_cache=False, torch_dtype=args.dtype)
        write_json(path, report.results, method=method, factor=None if method == "none" else args.factor, dtype=args.dtype,
                   model=args.model, documents=args.documents, seconds=round(time.perf_counter() - started, 1),
                   environment=report.environment)
        print(f"{method}: {round(time.perf_counter() - started)} s", flush=True)
    if args.table:
        Path(args.table).write_text(table(out, args.lengths, args.tasks) + "\n")
        print(table(out, args.lengths, args.tasks))


if __name__ == "__main__":
    main()
