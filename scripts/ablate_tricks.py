"""Ablations of issue 5's training tricks: the same recipe, seed and steps, with and without one trick.

Each variant trains SmolLM2-135M (bidirectional, mean pooling, LoRA r16 on all linear layers) with one
contrastive stage, then scores STS-B test (Spearman x100) and SciFact test (nDCG@10 x100). The training data is
SciFact train claims (with the retrieval instruction), SNLI triplets and STS-B train pairs scored >= 4 (the `mined`
variant replaces the SciFact rows with the same claims and ANCE-mined negatives). Two profiles:

- `cpu`: batch 8 + 1 hard negative, 32 tokens, float32; seeded samples of STS-B test (`--sts-pairs`) and SciFact
  test (`--queries` against their relevant documents plus random others up to `--corpus`), 64 tokens: minutes per
  variant on a 2-core CPU.
- `gpu`: batch 64 + 1 hard negative, 128 tokens, bfloat16; the full STS-B test and the full SciFact test
  (300 queries, 5183 documents), 256 tokens.

Embeddings are computed once at full size and truncated (and renormalised) for every Matryoshka dimension, and
for the variants in LAYER_EVAL also with only the first k layers, so each variant reports quality against
dimension (and layers). Results go to a JSONL file (one line per variant, appended, so an interrupted series
resumes by skipping variants already there); `--plot` draws quality against dimension and layers.
`seed2` is the baseline with another seed: the gap between the two is the noise a single seed carries.

    python -m scripts.ablate_tricks --steps 20 --variants untrained,baseline,hardness,matryoshka
    python -m scripts.ablate_tricks --profile gpu --base /tmp/smol-emb --steps 150 --variants all \
        --plot benchmarks/matryoshka_dims.png
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DIMS = [32, 64, 144, 288, 576]
LAYERS = [10, 20, 30]
INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"
PROFILES = {
    "cpu": {"batch_size": 8, "max_length": 32, "eval_max_length": 64, "dtype": "float32", "full_eval": False},
    "gpu": {"batch_size": 64, "max_length": 128, "eval_max_length": 256, "dtype": "bfloat16", "full_eval": True},
}


def base_recipe(steps: int, profile: str, base: str, data: Path) -> dict:
    settings = PROFILES[profile]
    datasets = [
        {"path": str(data / "scifact"), "format": "beir", "split": "train", "instruction": INSTRUCTION},
        {"path": str(data / "snli" / "triplets.jsonl")},
        {"path": str(data / "stsb" / "train.tsv"), "format": "scored_pairs", "score_threshold": 4.0},
    ]
    return {
        "model": {"base": base, "attention": "bidirectional", "pooling": "mean",
                  "max_length": settings["eval_max_length"], "dtype": settings["dtype"]},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "output_dir": "set-per-variant",
        "seed": 42,
        "logging_steps": 5,
        "save_steps": 10**6,
        "report_to": ["none"],
        "stages": [{
            "name": "contrastive", "max_steps": steps, "batch_size": settings["batch_size"],
            "gradcache_chunk": settings["batch_size"], "max_length": settings["max_length"],
            "learning_rate": 3.0e-4 if profile == "cpu" else 2.0e-4, "warmup_steps": max(0, steps // 10),
            "temperature": 0.05, "hard_negatives": 1, "datasets": datasets,
        }],
    }


def _adaptation(objective: str, data: Path, steps: int, profile: str) -> dict:
    """LLM2Vec's adaptation stage on raw text (SciFact abstracts' `text` column) before the contrastive stage:
    half the contrastive steps, batches of 8 x 64 tokens (cpu) or 32 x 128 tokens (gpu)."""
    batch_size, max_length = (8, 64) if profile == "cpu" else (32, 128)
    return {"name": objective, "objective": objective, "max_steps": max(1, steps // 2), "batch_size": batch_size,
            "max_length": max_length, "learning_rate": 1.0e-4, "hard_negatives": 0,
            "datasets": [{"path": str(data / "scifact" / "corpus.jsonl"), "format": "jsonl"}]}


def _mined(data: Path) -> dict:
    """SciFact train rows get ANCE-mined negatives (ranks 3-50, margin 0.95) instead of random in-batch fill."""
    scifact = data / "scifact"
    return {"corpus": str(scifact / "corpus.jsonl"), "queries": str(scifact / "queries.jsonl"),
            "qrels": str(scifact / "qrels" / "train.tsv"), "top_k": 50, "rank_window": [3, 50], "margin": 0.95,
            "num_negatives": 1, "instruction": INSTRUCTION, "batch_size": 64}


def apply_variant(recipe: dict, name: str, runs: Path, data: Path, steps: int, profile: str) -> dict:
    """The base recipe with one trick switched on; `guide` uses the baseline run's model."""
    recipe = copy.deepcopy(recipe)
    stage = recipe["stages"][0]
    if name == "seed2":
        recipe["seed"] = 43
    elif name == "hardness":
        stage["hardness_weight"] = 4.0
    elif name == "margin":
        stage["false_negative_margin"] = 0.95
    elif name == "learnable_temperature":
        stage["learnable_temperature"] = True
    elif name == "matryoshka":
        stage["matryoshka_dims"] = DIMS
    elif name == "matryoshka_2d":
        stage["matryoshka_layers"] = [[k, d] for k in LAYERS for d in (144, 576)]
    elif name == "guide":
        stage["guide_model"] = str(runs / "baseline" / "model")
    elif name == "mined":
        stage["mine"] = _mined(data)
        stage["datasets"] = [d for d in stage["datasets"] if d.get("format") != "beir"]
    elif name in ("mntp", "simcse"):
        recipe["stages"].insert(0, _adaptation(name, data, steps, profile))
    elif name != "baseline":
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return recipe


VARIANTS = ["untrained", "baseline", "seed2", "hardness", "margin", "learnable_temperature", "matryoshka",
            "matryoshka_2d", "mined", "mntp", "simcse", "guide", "merge"]
LAYER_EVAL = {"untrained", "baseline", "matryoshka", "matryoshka_2d"}


def evaluation_data(data: Path, full: bool, sts_pairs: int, query_count: int, corpus_size: int):
    """STS-B test and SciFact test: whole, or seeded samples (see the module docstring)."""
    import random

    from llm2emb.evaluate import load_beir, load_sts
    from llm2emb.evaluate.data import BeirData, StsData, subsample_corpus
    from llm2emb.evaluate.metrics import evaluated_queries

    sts = load_sts(data / "stsb" / "test.tsv")
    beir = load_beir(data / "scifact", "test")
    if full:
        return sts, beir
    keep = sorted(random.Random(0).sample(range(len(sts.scores)), sts_pairs))
    sts = StsData(sts.name, *([getattr(sts, f)[i] for i in keep] for f in ("sentences1", "sentences2", "scores")))
    chosen = set(random.Random(0).sample(sorted(evaluated_queries(beir.qrels)), query_count))
    qrels = {q: judged for q, judged in beir.qrels.items() if q in chosen}
    beir = subsample_corpus(BeirData(beir.name, beir.split, beir.doc_ids, beir.documents,
                                     [q for q in beir.query_ids if q in chosen],
                                     [t for q, t in zip(beir.query_ids, beir.queries) if q in chosen], qrels),
                            corpus_size, seed=0)
    return sts, beir


def evaluate(embedder, sts, beir, layers: int | None = None) -> dict:
    """STS Spearman and nDCG@10 (x100) at every dimension of DIMS, with the first `layers` layers (None: all)."""
    from llm2emb.evaluate.metrics import evaluated_queries, retrieval_scores, spearman
    from llm2emb.evaluate.search import top_k

    unique = list(dict.fromkeys(sts.sentences1 + sts.sentences2))
    position = {t: i for i, t in enumerate(unique)}
    counted = set(evaluated_queries(beir.qrels))
    query_ids = [q for q in beir.query_ids if q in counted]
    started = time.perf_counter()
    options = {"normalize": False, "layers": layers, "show_progress_bar": False}
    sentences = embedder.encode(unique, batch_size=64, **options)
    docs = embedder.encode_documents(beir.documents, batch_size=32, **options)
    queries = embedder.encode([t for q, t in zip(beir.query_ids, beir.queries) if q in counted],
                              instruction=INSTRUCTION, batch_size=64, **options)
    seconds = time.perf_counter() - started

    def unit(x: np.ndarray, dim: int) -> np.ndarray:
        x = x[:, :dim].astype(np.float32)
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


def run_variant(name: str, args, runs: Path, eval_data) -> dict:
    from llm2emb.model.embedder import Embedder

    started = time.perf_counter()
    settings = PROFILES[args.profile]
    record: dict = {"variant": name, "steps": args.steps, "profile": args.profile}
    if name == "untrained":
        embedder = Embedder.from_pretrained(args.base, pooling="mean", torch_dtype=getattr(torch, settings["dtype"]))
        record["changes"] = {}
    elif name == "merge":
        from llm2emb.commands.merge import merge

        folders = [runs / "baseline" / "model", runs / "hardness" / "model"]
        merge(folders, runs / "merge" / "model", overwrite=True)
        embedder = Embedder.from_pretrained(runs / "merge" / "model")
        record["changes"] = {"merge": "llm2emb merge baseline/model hardness/model (weights 0.5, 0.5)"}
    else:
        from llm2emb.train.runner import train

        baseline = base_recipe(args.steps, args.profile, args.base, Path(args.data))
        recipe = apply_variant(baseline, name, runs, Path(args.data), args.steps, args.profile)
        recipe["output_dir"] = str(runs / name)
        path = runs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        shutil.rmtree(runs / name, ignore_errors=True)  # an interrupted run of this variant: start it again
        summary = train(path)
        record["changes"] = _changes(baseline, recipe)
        record["train_seconds"] = round(summary.seconds, 1)
        record["final_loss"] = summary.stages[-1]["final_loss"]
        embedder = Embedder.from_pretrained(summary.model_dir)
    embedder.config.max_length = settings["eval_max_length"]
    record.update(evaluate(embedder, *eval_data))
    if name in LAYER_EVAL:
        record["by_layers"] = {k: evaluate(embedder, *eval_data, layers=k) for k in LAYERS[:-1]}
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return record


def _changes(before: dict, after: dict) -> dict:
    """What a variant's recipe changes, for the record: top-level keys and the contrastive stage's keys."""
    changed = {k: after[k] for k in after if k not in ("output_dir", "stages") and after[k] != before.get(k)}
    stage, base_stage = after["stages"][-1], before["stages"][0]
    changed.update({f"stage.{k}": v for k, v in stage.items() if v != base_stage.get(k)})
    if len(after["stages"]) > 1:
        changed["first_stage"] = after["stages"][0]["objective"]
    return changed


def plot(results: list[dict], target: Path) -> None:
    """Quality against Matryoshka dimension (all layers), and against layers at full dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    keys = ("sts", "scifact_ndcg10")
    titles = ("STS-B test Spearman x100", "SciFact test nDCG@10 x100")
    for record in results:
        for column, key in enumerate(keys):
            axes[0, column].plot(DIMS, [_at(record[key], d) for d in DIMS], marker="o", label=record["variant"])
            if "by_layers" in record:
                points = [_at(_at(record["by_layers"], k), key) for k in LAYERS[:-1]]
                axes[1, column].plot(LAYERS, [_at(p, DIMS[-1]) for p in points] + [_at(record[key], DIMS[-1])],
                                     marker="o", label=record["variant"])
    for column, title in enumerate(titles):
        axes[0, column].set_xscale("log", base=2)
        axes[0, column].set_xticks(DIMS, [str(d) for d in DIMS])
        axes[0, column].set_xlabel("embedding dimension (first d components, renormalised; all layers)")
        axes[1, column].set_xticks(LAYERS)
        axes[1, column].set_xlabel(f"transformer layers run (of {LAYERS[-1]}; dimension {DIMS[-1]})")
        for row in range(2):
            axes[row, column].set_title(title)
            axes[row, column].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M + LoRA: quality against Matryoshka dimension and layers")
    figure.tight_layout()
    figure.savefig(target, dpi=100)


def table(results: list[dict]) -> str:
    """Markdown: each variant at full size, at dimension 144 and with the first 10 layers, against the baseline."""
    baseline = next((r for r in results if r["variant"] == "baseline"), None)
    lines = ["| variant | recipe change | final loss | train s | STS-B d576 | (vs baseline) | STS-B d144 | "
             "SciFact d576 | (vs baseline) | SciFact d144 | STS-B / SciFact, 10 layers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        changes = [f"`{k}: {v}`" if len(str(v)) <= 90 else f"`{k}` (see the script)" for k, v in r.get("changes", {}).items()]
        cells = [r["variant"], ", ".join(changes) or "-",
                 f"{r['final_loss']:.3f}" if "final_loss" in r else "-", str(r.get("train_seconds", "-"))]
        for key in ("sts", "scifact_ndcg10"):
            full = _at(r[key], DIMS[-1])
            gap = f"{full - _at(baseline[key], DIMS[-1]):+.2f}" if baseline and r is not baseline else ""
            cells += [f"{full:.2f}", gap, f"{_at(r[key], 144):.2f}"]
        ten = _at(r["by_layers"], 10) if "by_layers" in r else None
        cells.append(f"{_at(ten['sts'], DIMS[-1]):.2f} / {_at(ten['scifact_ndcg10'], DIMS[-1]):.2f}" if ten else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _at(values: dict, key):
    """A JSON round trip turns int keys into strings; read either."""
    return values[str(key)] if str(key) in values else values[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--base", default="smollm2-135m", help="base model (asset alias, folder or .gguf)")
    parser.add_argument("--data", default=str(DATA), help="../shared/data (stsb, scifact, snli)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="untrained,baseline,hardness,matryoshka", help=f"or all: {VARIANTS}")
    parser.add_argument("--sts-pairs", type=int, default=300, help="cpu profile: STS-B test sample")
    parser.add_argument("--queries", type=int, default=100, help="cpu profile: SciFact test query sample")
    parser.add_argument("--corpus", type=int, default=300, help="cpu profile: SciFact corpus sample")
    parser.add_argument("--runs", default="runs/ablations", help="folder for the runs' outputs")
    parser.add_argument("--results", default="benchmarks/ablations.jsonl")
    parser.add_argument("--plot", help="PNG of quality against dimension and layers")
    parser.add_argument("--table", action="store_true", help="print a markdown table of the results at the end")
    args = parser.parse_args()
    runs, results_path = Path(args.runs).resolve(), Path(args.results)
    runs.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    same_setting = [r for r in done if r["steps"] == args.steps and r.get("profile", "cpu") == args.profile]
    eval_data = evaluation_data(Path(args.data), PROFILES[args.profile]["full_eval"], args.sts_pairs, args.queries,
                                args.corpus)
    names = VARIANTS if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for name in names:
        if any(r["variant"] == name for r in same_setting):
            print(f"{name}: already in {results_path}, skipped")
            continue
        record = run_variant(name, args, runs, eval_data)
        record["machine"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else f"{platform.processor() or platform.machine()}, CPU only")
        record["eval"] = ("full STS-B test, full SciFact test" if PROFILES[args.profile]["full_eval"] else
                          f"samples: {args.sts_pairs} STS-B pairs, {args.queries} SciFact queries x {args.corpus} docs")
        same_setting.append(record)
        with results_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    if args.plot:
        chosen = [r for r in same_setting if r["variant"] in ("untrained", "baseline", "matryoshka", "matryoshka_2d")]
        plot(chosen, Path(args.plot))
        print(f"wrote {args.plot}")
    if args.table:
        print(table(same_setting))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
