"""Ablations of issue 5's training tricks: the same short recipe, seed and steps, with and without one trick.

Each variant trains SmolLM2-135M (bidirectional, mean pooling, LoRA r16) on SNLI triplets from ../shared/data
(batch 8 + 1 hard negative each, 32 tokens, `--steps` steps), then scores seeded samples of STS-B test (Spearman
x100, `--sts-pairs` pairs) and SciFact test (nDCG@10 x100, `--queries` queries against their relevant documents plus
random others up to `--corpus` documents, 64 tokens). The samples keep a run within minutes on a shared 2-core CPU.
Embeddings are computed once at full size and truncated (and renormalised) for every Matryoshka dimension, so
each variant also reports quality against dimension. Results go to a JSONL file (one line per variant, appended,
so an interrupted series resumes by skipping variants already there); `--plot` draws quality against dimension.

    python scripts/ablate_tricks.py --steps 20 --variants untrained,baseline,hardness,matryoshka
    python scripts/ablate_tricks.py --variants merge --plot benchmarks/matryoshka_dims.png

CPU budget: a CPU-feasible run is short (tens of steps), so differences of a point or two are within the noise
of one seed; RESULTS.md says so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DIMS = [32, 64, 144, 288, 576]
INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"


def base_recipe(steps: int, output_dir: Path) -> dict:
    return {
        "model": {"base": "smollm2-135m", "attention": "bidirectional", "pooling": "mean", "max_length": 64,
                  "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "output_dir": str(output_dir),
        "seed": 42,
        "logging_steps": 5,
        "save_steps": 10**6,
        "report_to": ["none"],
        "stages": [{
            "name": "contrastive", "max_steps": steps, "batch_size": 8, "gradcache_chunk": 8, "max_length": 32,
            "learning_rate": 3.0e-4, "warmup_steps": max(0, steps // 5), "temperature": 0.05, "hard_negatives": 1,
            "datasets": [{"path": str(DATA / "snli" / "triplets.jsonl")}],
        }],
    }


# variant -> --set overrides of the base recipe ("guide" and "merge" use earlier runs' models)
VARIANTS = {
    "baseline": [],
    "hardness": ["stages[0].hardness_weight=4.0"],
    "margin": ["stages[0].false_negative_margin=0.95"],
    "learnable_temperature": ["stages[0].learnable_temperature=true"],
    "matryoshka": [f"stages[0].matryoshka_dims={json.dumps(DIMS)}"],
    "guide": ["stages[0].guide_model=RUNS/baseline/model"],
}


def evaluate(embedder, sts_pairs: int, query_count: int, corpus_size: int) -> dict:
    """STS-B test Spearman and SciFact test nDCG@10 (x100) at every dimension of DIMS, on seeded samples."""
    import random

    from llm2emb.evaluate import load_beir, load_sts
    from llm2emb.evaluate.data import BeirData, StsData, subsample_corpus
    from llm2emb.evaluate.metrics import evaluated_queries, retrieval_scores, spearman
    from llm2emb.evaluate.search import top_k

    full_sts = load_sts(DATA / "stsb" / "test.tsv")
    keep = sorted(random.Random(0).sample(range(len(full_sts.scores)), sts_pairs))
    sts = StsData(full_sts.name, *([getattr(full_sts, f)[i] for i in keep] for f in ("sentences1", "sentences2", "scores")))
    full = load_beir(DATA / "scifact", "test")
    chosen = set(random.Random(0).sample(sorted(evaluated_queries(full.qrels)), query_count))
    qrels = {q: judged for q, judged in full.qrels.items() if q in chosen}
    beir = subsample_corpus(BeirData(full.name, full.split, full.doc_ids, full.documents,
                                     [q for q in full.query_ids if q in chosen],
                                     [t for q, t in zip(full.query_ids, full.queries) if q in chosen], qrels),
                            corpus_size, seed=0)
    unique = list(dict.fromkeys(sts.sentences1 + sts.sentences2))
    position = {t: i for i, t in enumerate(unique)}
    counted = set(evaluated_queries(beir.qrels))
    query_ids = [q for q in beir.query_ids if q in counted]
    started = time.perf_counter()
    sentences = embedder.encode(unique, batch_size=64, normalize=False)
    docs = embedder.encode_documents(beir.documents, batch_size=32, normalize=False)
    queries = embedder.encode([t for q, t in zip(beir.query_ids, beir.queries) if q in counted],
                              instruction=INSTRUCTION, batch_size=64, normalize=False)
    seconds = time.perf_counter() - started

    def unit(x: np.ndarray, dim: int) -> np.ndarray:
        x = x[:, :dim]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    out = {"eval_seconds": round(seconds, 1), "sts": {}, "scifact_ndcg10": {}}
    for dim in DIMS:
        s = unit(sentences, dim)
        a, b = s[[position[t] for t in sts.sentences1]], s[[position[t] for t in sts.sentences2]]
        out["sts"][dim] = round(spearman(np.einsum("ij,ij->i", a, b), sts.scores), 2)  # already x100
        ranked, _ = top_k(unit(queries, dim), unit(docs, dim), 10)
        ranking = {q: [beir.doc_ids[i] for i in row] for q, row in zip(query_ids, ranked)}
        out["scifact_ndcg10"][dim] = round(retrieval_scores(ranking, beir.qrels, ["ndcg@10"])["ndcg@10"], 2)
    return out


def run_variant(name: str, steps: int, runs: Path, sizes: tuple[int, int, int]) -> dict:
    from llm2emb.model import Embedder

    started = time.perf_counter()
    record: dict = {"variant": name, "steps": steps}
    if name == "untrained":
        embedder = Embedder.from_pretrained("smollm2-135m", pooling="mean", torch_dtype="float32")
        embedder.config.max_length = 64
        record["overrides"] = []
    elif name == "merge":
        from llm2emb.merge import merge

        folders = [runs / "baseline" / "model", runs / "hardness" / "model"]
        merge(folders, runs / "merge" / "model", overwrite=True)
        embedder = Embedder.from_pretrained(runs / "merge" / "model")
        record["overrides"] = ["llm2emb merge runs/baseline/model runs/hardness/model (weights 0.5, 0.5)"]
    else:
        from llm2emb.train.runner import train

        recipe = runs / "base.yaml"
        recipe.write_text(yaml.safe_dump(base_recipe(steps, runs / "unused"), sort_keys=False))
        overrides = [o.replace("RUNS", str(runs)) for o in VARIANTS[name]] + [f"output_dir={runs / name}"]
        shutil.rmtree(runs / name, ignore_errors=True)  # an interrupted run of this variant: start it again
        summary = train(recipe, overrides)
        record["overrides"] = VARIANTS[name]
        record["train_seconds"] = round(summary.seconds, 1)
        record["final_loss"] = summary.stages[-1]["final_loss"]
        embedder = Embedder.from_pretrained(summary.model_dir)
    record.update(evaluate(embedder, *sizes))
    record["eval"] = {"sts_pairs": sizes[0], "scifact_queries": sizes[1], "scifact_corpus": sizes[2], "max_length": 64}
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return record


def plot(results: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for record in results:
        for axis, key in zip(axes, ("sts", "scifact_ndcg10")):
            dims = sorted(int(d) for d in record[key])
            axis.plot(dims, [record[key][str(d)] if str(d) in record[key] else record[key][d] for d in dims],
                      marker="o", label=record["variant"])
    for axis, title in zip(axes, ("STS-B test Spearman x100 (sample)", "SciFact test nDCG@10 x100 (sample)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(DIMS, [str(d) for d in DIMS])
        axis.set_xlabel("embedding dimension (first d components, renormalised)")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M + LoRA: quality against Matryoshka dimension")
    figure.tight_layout()
    figure.savefig(target, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="untrained,baseline,hardness,matryoshka")
    parser.add_argument("--sts-pairs", type=int, default=300)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--corpus", type=int, default=300)
    parser.add_argument("--runs", default="runs/ablations", help="folder for the runs' outputs")
    parser.add_argument("--results", default="benchmarks/ablations.jsonl")
    parser.add_argument("--plot", help="PNG of quality against dimension (untrained, baseline, matryoshka)")
    args = parser.parse_args()
    runs, results_path = Path(args.runs).resolve(), Path(args.results)
    runs.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    for name in [v for v in args.variants.split(",") if v]:
        if any(r["variant"] == name and r["steps"] == args.steps for r in done):
            print(f"{name}: already in {results_path}, skipped")
            continue
        record = run_variant(name, args.steps, runs, (args.sts_pairs, args.queries, args.corpus))
        record["machine"] = f"{platform.processor() or platform.machine()}, CPU only"
        done.append(record)
        with results_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record))
    if args.plot:
        chosen = [r for r in done if r["variant"] in ("untrained", "baseline", "matryoshka")]
        plot(chosen, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
