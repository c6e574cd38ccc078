"""Synthetic training data on SciFact: real claims vs claims the base model wrote vs both, at the same steps.

The question `llm2emb synth` must answer: do rows an instruct decoder writes for a corpus train an embedder as well as
human queries for it? The documents are the abstracts SciFact's train claims cite (`qrels/train.tsv`); (a) trains on
those 809 real claims (one row per claim and cited abstract), (b) on claims `llm2emb synth --tasks claim` wrote for the same abstracts (kept only when the
filter model ranks the abstract in its top-k of those abstracts), (c) on both mixed. Every system starts from the
same base with the defaults plus the same steps, batch and max length, every query gets the claim task's
instruction (real ones included, so only the query text differs), and each is scored on SciFact test (nDCG@10, with
that instruction). Also reported: the generator's throughput and the cleaning and filter's keep rates.

Jobs run as subprocesses with one thread each, `--jobs` side by side (generation beside the real-claims run); a job
whose result file exists is skipped and training resumes from its checkpoints, so an interrupted series continues.

    python -m scripts.bench_synth --base runs/q/smol-bi --generator smollm2-135m \
        --filter-model runs/compare51/default-s1/run/model --out runs/synth --table benchmarks/synth.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scripts.compare_recipes import record_train_seconds
from scripts.jobs import Job, run_jobs, without_reporting

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SYSTEMS = {"real": ("real",), "synthetic": ("synthetic",), "both": ("real", "synthetic")}
"""System -> the row files it trains on."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="llm2emb base every system trains from")
    p.add_argument("--generator", required=True, help="causal LM for `llm2emb synth` (asset alias, folder, hub id)")
    p.add_argument("--filter-model", help="consistency filter's embedder (default: the base)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--synth-batch-size", type=int, default=16, help="prompts generated at once")
    p.add_argument("--scifact", default=str(DATA / "scifact"))
    p.add_argument("--documents", type=int, help="only the first N cited abstracts (and the claims citing them)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--eval-max-length", type=int, default=256)
    p.add_argument("--corpus-sample", type=int, default=1000, help="SciFact test documents kept (0: all 5,183)")
    p.add_argument("--eval-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    return p.parse_args(argv)


def instruction() -> str:
    from llm2emb.commands.synth import TASKS

    return TASKS["claim"][1]


# ---- data ----------------------------------------------------------------------------------------------------


def write_inputs(args, out: Path) -> None:
    """The cited abstracts as a corpus for `synth`, and the real claims as rows with the claim task's instruction."""
    from llm2emb.evaluate import load_beir
    from llm2emb.files import write_text_atomic

    corpus_path, real_path = out / "train_corpus.jsonl", out / "real.jsonl"
    if corpus_path.is_file() and real_path.is_file():
        return
    train = load_beir(args.scifact, "train")
    text_of = dict(zip(train.doc_ids, train.documents))
    query_of = dict(zip(train.query_ids, train.queries))
    cited = sorted({doc for relevant in train.qrels.values() for doc, score in relevant.items() if score > 0})
    cited = cited[:args.documents] if args.documents else cited
    kept = set(cited)
    rows = [{"query": query_of[query], "positive": text_of[doc], "instruction": instruction()}
            for query, relevant in train.qrels.items() for doc, score in relevant.items() if score > 0 and doc in kept]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(corpus_path, "".join(json.dumps({"_id": doc, "text": text_of[doc]}) + "\n" for doc in cited))
    write_text_atomic(real_path, "".join(json.dumps(row) + "\n" for row in rows))


# ---- jobs ----------------------------------------------------------------------------------------------------


def synth_job(args, out: Path) -> None:
    from llm2emb.commands.synth import synth_from_files

    stats = synth_from_files(out / "train_corpus.jsonl", args.generator, out / "synthetic.jsonl", id_field="_id",
                             embedder_reference=args.filter_model or args.base, tasks=["claim"], top_k=args.top_k,
                             batch_size=args.synth_batch_size, seed=args.seed, progress=False)
    report = {"documents": stats.documents, "generated": stats.generated, "dropped_in_cleaning": stats.dropped,
              "clean": stats.candidates, "dropped_by_filter": stats.dropped_by_filter, "kept": stats.kept,
              "seconds": round(stats.seconds, 1), "new_tokens": stats.new_tokens,
              "generations_per_s": round(stats.generated / max(stats.seconds, 1e-9), 3),
              "tokens_per_s": round(stats.new_tokens / max(stats.seconds, 1e-9), 1)}
    (out / "synth.json").write_text(json.dumps(report, indent=2) + "\n")


def train_job(args, out: Path, system: str) -> None:
    folder = out / f"{system}-s{args.seed}"
    model_dir = folder / "run" / "model"
    if not (model_dir / "llm2emb.json").is_file():
        recipe = {
            "model": {"base": str(Path(args.base).resolve()) if Path(args.base).exists() else args.base,
                      "max_length": args.max_length},
            "output_dir": str((folder / "run").resolve()),
            "seed": args.seed,
            "report_to": [],
            "save_steps": 10,
            "stages": [{"name": "train", "max_steps": args.steps, "batch_size": args.batch_size,
                        "hard_negatives": 0,
                        "datasets": [{"path": str((out / f"{name}.jsonl").resolve())} for name in SYSTEMS[system]]}],
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        command = [sys.executable, "-m", "llm2emb.cli", "train", str(folder / "recipe.yaml")]
        resumed = (folder / "run" / "stages").exists()
        started = time.perf_counter()
        subprocess.run(command + (["--resume"] if resumed else []), check=True)
        record_train_seconds(folder, time.perf_counter() - started, resumed=resumed)
    timed = folder / "train_seconds"
    result = {"system": system, "seed": args.seed, **evaluate(args, model_dir),
              "train_seconds": float(timed.read_text()) if timed.is_file() else None,
              "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length}
    (folder / result_name(args)).write_text(json.dumps(result, indent=2) + "\n")


def evaluate(args, model_dir: Path) -> dict:
    import torch

    from llm2emb.evaluate import load_beir
    from llm2emb.evaluate.data import subsample_corpus
    from llm2emb.evaluate.retrieval import evaluate_retrieval
    from llm2emb.evaluate.runner import load_model

    model = load_model(model_dir, max_length=args.eval_max_length, torch_dtype=getattr(torch, args.eval_dtype))
    test = load_beir(args.scifact, "test")
    if args.corpus_sample:
        test = subsample_corpus(test, args.corpus_sample)
    started = time.perf_counter()
    score = evaluate_retrieval(model, test, query_instruction=instruction(), batch_size=16).main
    return {"scifact": round(score, 2), "documents": len(test.documents),
            "eval_seconds": round(time.perf_counter() - started, 1)}


def result_name(args) -> str:
    return f"result-scifact{args.corpus_sample or 'full'}-{args.eval_max_length}-{args.eval_dtype}.json"


# ---- orchestration -------------------------------------------------------------------------------------------


def pending_jobs(args, out: Path) -> list[Job]:
    """The jobs not done yet, each after the jobs it needs (a synthetic-data system waits for the generation)."""
    jobs = []
    if any("synthetic" in SYSTEMS[s] for s in args.systems) and not (out / "synth.json").is_file():
        jobs.append(Job("synth", ["--job", "synth"]))
    for system in args.systems:
        if not (out / f"{system}-s{args.seed}" / result_name(args)).is_file():
            jobs.append(Job(system, ["--job", system], {"synth"} if "synthetic" in SYSTEMS[system] else set()))
    return jobs


def run_all(args, argv) -> None:
    out = Path(args.out)
    write_inputs(args, out)
    run_jobs("scripts.bench_synth", pending_jobs(args, out), without_reporting(argv), args.jobs, out)


def table(args, out: Path) -> str:
    synth = json.loads((out / "synth.json").read_text()) if (out / "synth.json").is_file() else None
    lines = ["| training rows | rows | SciFact test nDCG@10 | train s |", "|---|---|---|---|"]
    counts = {name: sum(1 for _ in open(out / f"{name}.jsonl")) for name in ("real", "synthetic")
              if (out / f"{name}.jsonl").is_file()}
    for system in args.systems:
        path = out / f"{system}-s{args.seed}" / result_name(args)
        if path.is_file():
            result = json.loads(path.read_text())
            rows = sum(counts.get(name, 0) for name in SYSTEMS[system])
            seconds = "-" if result["train_seconds"] is None else f"{result['train_seconds']:.0f}"
            lines.append(f"| {system} | {rows} | {result['scifact']:.2f} | {seconds} |")
    if synth:
        lines += ["", f"Generation: {synth['generated']} claims for {synth['documents']} abstracts in "
                      f"{synth['seconds']:.0f} s ({synth['generations_per_s']} claims/s, {synth['tokens_per_s']} "
                      f"new tokens/s); {synth['clean']} clean and distinct (dropped: {synth['dropped_in_cleaning']}), "
                      f"{synth['kept']} kept by the filter ({100 * synth['kept'] / max(synth['clean'], 1):.0f}%)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.out)
    if args.job == "synth":
        synth_job(args, out)
    elif args.job:
        train_job(args, out, args.job)
    else:
        run_all(args, argv)
        text = table(args, out)
        print(text)
        if args.table:
            Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    main()
