"""llm2emb recipes against sentence-transformers' MNRL script on the same base, rows, order, steps, batch and length.

The question a user asks before switching: with my base model, my data and my budget, does llm2emb train a better
embedder than the script I would otherwise run? Every system here trains on the first `--rows` SNLI triplets
(query, positive, one hard negative; in-batch negatives), in the same batches: the batch order is llm2emb's own
(`MixedBatchSampler` for the seed) and sentence-transformers is given the rows in that order with a sequential
batch sampler. The baseline is sentence-transformers' plain script: causal base, mean pooling, full fine-tuning,
MultipleNegativesRankingLoss at its defaults (scale 20, i.e. temperature 0.05; learning rate 5e-5, linear decay,
no warmup). sentence-transformers 6 renders every text through the tokenizer's chat template when it has one (SmolLM2:
its system prompt and a user turn, 26 tokens around the text, inside `--max-length`, all of them pooled), so the
script trains and scores with that wrap: what its users get, and what llm2emb's `text_template` gives its own models. llm2emb systems are recipes that set only the base, the data, `max_steps`, `batch_size`, `max_length`
and `hard_negatives` (the `default` system), or those plus `--set`-style overrides (`NAME:key=value,key=value`).

Each (system, seed) is one job, run as a subprocess with `--threads` threads (one by default, so that `--jobs 2`
runs two side by side on two cores; sentence-transformers' full fine-tune at 200 x 32 peaks near 12 GB, so two of
those side by side overrun 24 GB); a job writes `<out>/<system>-s<seed>/result-<evaluation settings>.json` and is
skipped when that exists, so an interrupted series continues where it stopped (llm2emb jobs also `--resume` their
training). Evaluation is the same code for all: STS-B test (Spearman x100) and SciFact test (nDCG@10 x100, no
instruction on either side since no system trained with one; the full 5,183-document corpus unless
`--corpus-sample`), both at `--eval-max-length` tokens.

    python -m scripts.compare_recipes --base runs/q/smol-bi --causal-base runs/q/smol-causal --steps 51 \
        --seeds 1 2 3 --systems st default --jobs 2 --out runs/compare51
    python -m scripts.compare_recipes ... --table benchmarks/compare_recipes_51.md --plot benchmarks/compare_51.png

`--report ROWS.jsonl` builds the table and the plot from result rows kept in the repository (one JSON object per
line, as a job writes them) and trains nothing: runs spread over sessions outlive the machine that holds `--out`.
`--collect ROWS.jsonl` (with the same `--out`, `--systems`, `--seeds` and `--row-seeds`) writes that file from the
results under `--out`. `--report` with `--seeds` and `--row-seeds` keeps only those runs, so systems run on more
orders than others are compared on the orders they share.

Row orders: `--row-seeds` gives run i the rows of a seeded permutation of the whole `--data` file (training seed i);
without it every seed trains on the file's first rows. llm2emb runs train with the collapse guard off and log every
step, and each result records whether the default guard would have stopped the run (`collapsed`, replayed from the
curve), so a stopped run still has its scores beside the guard's verdict.

    python -m scripts.compare_recipes --report benchmarks/compare_200.jsonl --systems st default \
        --table benchmarks/compare_recipes_200.md --plot benchmarks/compare_200.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from scripts.jobs import Job, run_jobs, without_reporting
from scripts.results_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="llm2emb base for the recipes (folder, asset alias or hub id)")
    p.add_argument("--causal-base", help="HF folder of the same base with causal attention (for ST)")
    p.add_argument("--data", default=str(DATA / "snli" / "triplets.jsonl"))
    p.add_argument("--rows", type=int, help="first ROWS triplets (default: steps x batch size)")
    p.add_argument("--steps", type=int, default=51)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--row-seeds", type=int, nargs="+",
                   help="one per --seeds entry: run i trains with seed i on the rows of row order i (a permutation "
                        "of the whole --data file, the first ROWS of it); default: the file's first rows for every seed")
    p.add_argument("--systems", nargs="+", default=["st", "default"],
                   help="st | st-NAME:key=value,... (sentence-transformers training-argument overrides, e.g. "
                        "learning_rate=1e-4,warmup_ratio=0.1; lora_r=16,lora_alpha=32 for a LoRA adapter) | "
                        "default | NAME:key.path=value,... (recipe overrides on top of default)")
    p.add_argument("--jobs", type=int, default=2, help="jobs side by side, --threads threads each")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per job: 1 so that --jobs 2 fills two cores; 2 with --jobs 1 finishes one job sooner")
    p.add_argument("--tasks", nargs="+", default=["stsb", "scifact"], choices=list(TASKS),
                   help="evaluations to run: stsb (test), stsb-dev (the split for model selection: screen candidates "
                        "with it alone, minutes instead of most of an hour), scifact")
    p.add_argument("--eval-max-length", type=int, default=256)
    p.add_argument("--corpus-sample", type=int, help="SciFact documents kept (every relevant one + random others)")
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", help="folder for the runs and results")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each scored run's model (default: only its result, curve and recipe; another evaluation "
                        "setting then retrains it)")
    p.add_argument("--report", metavar="ROWS_JSONL", nargs="+",
                   help="table and plot from the result rows of these files; train nothing")
    p.add_argument("--collect", metavar="ROWS_JSONL",
                   help="write the result rows found under --out for these systems and runs to ROWS_JSONL (the file "
                        "to commit: run folders do not outlive the machine), then report them; train nothing")
    p.add_argument("--baselines", nargs="+", metavar="NAME",
                   help="the sentence-transformers systems the gap table compares against (default: every one)")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--results-block", metavar="NAME",
                   help="also put the table in benchmarks/RESULTS.md's block NAME (scripts/results_block.py)")
    p.add_argument("--plot", help="write a PNG of the scores per system and seed here")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job (system name) in this process
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--row-seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.collect and not args.out:
        p.error("--collect needs --out, the folder whose results it gathers")
    if not args.report and not args.collect and not (args.base and args.causal_base and args.out):
        p.error("--base, --causal-base and --out are required unless --report or --collect is given")
    if args.row_seeds is not None and len(args.row_seeds) != len(args.seeds):
        p.error(f"--row-seeds needs one row order per seed: {len(args.seeds)} seeds, {len(args.row_seeds)} row seeds")
    return args


TASKS = {"stsb": "STS-B test", "stsb-dev": "STS-B dev", "scifact": "SciFact nDCG@10"}
"""Evaluation name -> its column heading; each is also the key of its score in a result row."""


def runs(args) -> list[tuple[int, int | None]]:
    """(training seed, row seed) of every run; row seed None: the file's first rows."""
    return list(zip(args.seeds, args.row_seeds or [None] * len(args.seeds)))


def run_name(system: str, seed: int, row_seed: int | None) -> str:
    return f"{system}-s{seed}" + (f"-r{row_seed}" if row_seed is not None else "")


def is_st(system: str) -> bool:
    """A sentence-transformers system: `st`, or `st-NAME` with training-argument overrides."""
    return system == "st" or system.startswith("st-")


def system_name(spec: str) -> str:
    return spec.partition(":")[0]


def result_name(args) -> str:
    """One result file per evaluation setting: a later run with other settings re-evaluates the trained models."""
    tasks = "+".join(f"scifact{args.corpus_sample or 'full'}" if task == "scifact" else task
                     for task in sorted(args.tasks))
    return f"result-{tasks}-{args.eval_max_length}-{args.eval_dtype}.json"


# ---- data ----------------------------------------------------------------------------------------------------


def rows_in_llm2emb_order(args, seed: int, rows_file: Path) -> list[dict]:
    """The rows as llm2emb's sampler batches them for this seed (epoch after epoch), flattened."""
    from llm2emb.train.data import MixedBatchSampler, training_order

    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    sampler = MixedBatchSampler([len(rows)], [1.0], args.batch_size, seed)
    return [rows[i] for i in training_order(sampler, args.steps * args.batch_size)]


def write_rows(args, out: Path, row_seed: int | None = None) -> Path:
    """The first ROWS triplets of the file, or of its permutation by `row_seed`, as a JSONL both systems read."""
    target = out / ("rows.jsonl" if row_seed is None else f"rows-r{row_seed}.jsonl")
    if not target.is_file():
        count = args.rows or args.steps * args.batch_size
        with open(args.data, encoding="utf-8") as handle:
            lines = [line if line.endswith("\n") else line + "\n" for line in handle if line.strip()]
        if row_seed is not None:
            lines = [lines[i] for i in np.random.default_rng(row_seed).permutation(len(lines))]
        out.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines[:count]))
    return target


# ---- one job -------------------------------------------------------------------------------------------------


def sequential_batches(data, batch_size, drop_last, **_):
    """The rows in file order (already llm2emb's batch order); module-level so checkpoints can pickle it."""
    import torch

    return torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), batch_size, drop_last)


def st_overrides(spec: str) -> dict:
    """`st-NAME:learning_rate=1e-4,warmup_ratio=0.1` -> training-argument overrides, values read as YAML."""
    pairs = [pair.split("=", 1) for pair in spec.partition(":")[2].split(",") if pair]
    return {key: number_or_yaml(value) for key, value in pairs}


def number_or_yaml(text: str):
    """`text` as YAML, and a string that is a number (`1e-4`, which YAML 1.1 leaves a string) as that number."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


LORA_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha"}
"""st-NAME overrides that give the script a LoRA adapter (peft's LoraConfig keys) on every linear layer and without
dropout, as llm2emb's `lora:` is. sentence-transformers' own `add_adapter` goes through transformers' PEFT
integration, which asks for peft >= 0.22 (not on the registry), so the adapter wraps the transformer with peft
directly: the same LoRA layers."""


def train_st(args, spec: str, seed: int, rows_file: Path, folder: Path) -> Path:
    """sentence-transformers' MNRL script on the causal base, fed llm2emb's batches in order; `spec`'s overrides
    (learning rate, warmup, schedule) go to its training arguments, `lora_r`/`lora_alpha` to an adapter; everything
    else stays at the script's defaults. An adapter is merged into the saved model, so both systems' models are
    scored alike."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        models,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model_dir = folder / "model"
    if (model_dir / "modules.json").is_file():
        return model_dir
    rows = rows_in_llm2emb_order(args, seed, rows_file)
    dataset = Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                                 "negative": [r["negative"] for r in rows]})
    torch.manual_seed(seed)
    transformer = models.Transformer(args.causal_base, max_seq_length=args.max_length)
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    overrides = st_overrides(spec)
    lora = {LORA_KEYS[key]: overrides.pop(key) for key in list(overrides) if key in LORA_KEYS}
    if lora:
        from peft import LoraConfig, get_peft_model

        model[0].model = get_peft_model(model[0].model,
                                        LoraConfig(**lora, lora_dropout=0.0, target_modules="all-linear"))

    training = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        seed=seed, batch_sampler=sequential_batches, save_strategy="steps", save_steps=10, save_total_limit=1,
        logging_steps=5, report_to=[], use_cpu=True, dataloader_drop_last=True, **overrides,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model))
    started = time.perf_counter()
    checkpoints = list((folder / "trainer").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=bool(checkpoints) or None)  # an interrupted job continues
    if lora:
        merge_adapter(model)
    model.save(str(model_dir))
    record_train_seconds(folder, time.perf_counter() - started, resumed=bool(checkpoints))
    return model_dir


def merge_adapter(model) -> None:
    """Fold the trained adapter into the transformer's weights, so the saved folder is a plain sentence-transformers
    model."""
    model[0].model = model[0].model.merge_and_unload()


def train_llm2emb(args, spec: str, seed: int, rows_file: Path, folder: Path) -> Path:
    """`llm2emb train` on a recipe of the defaults plus the system's overrides."""
    model_dir = folder / "run" / "model"
    if (model_dir / "llm2emb.json").is_file():
        return model_dir
    recipe = {
        "model": {"base": str(Path(args.base).resolve()) if Path(args.base).exists() else args.base,
                  "max_length": args.max_length},
        "output_dir": str((folder / "run").resolve()),
        "seed": seed,
        "report_to": [],
        "save_steps": 10,  # an interrupted job resumes from its last checkpoint, as sentence-transformers' jobs do
        "logging_steps": 1,  # every step's loss and spread in metrics.jsonl: the curves the collapse guard is tested on
        # the guard is off so that every run ends and is scored; its verdict is replayed from the curve afterwards
        "stages": [{"name": "train", "max_steps": args.steps, "batch_size": args.batch_size, "hard_negatives": 1,
                    "collapse_guard": None, "datasets": [{"path": str(rows_file.resolve())}]}],
    }
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    overrides = [item for pair in spec.partition(":")[2].split(",") if pair for item in ("--set", pair)]
    command = [sys.executable, "-m", "llm2emb.cli", "train", str(path), *overrides]
    holds = (folder / "run" / "stages").exists()
    started = time.perf_counter()
    subprocess.run(command + (["--resume"] if holds else []), check=True)
    record_train_seconds(folder, time.perf_counter() - started, resumed=holds)
    return model_dir


def training_record(folder: Path) -> dict:
    """What an llm2emb run's own files say of its health: its last logged loss and spread, and whether the default
    collapse guard would have stopped it (replayed from its per-step curve; the run itself trained with it off)."""
    from llm2emb.train.collapse import CollapseGuard, replay
    from llm2emb.train.recipe_file import load_recipe

    stage = load_recipe(folder / "run" / "recipe.resolved.yaml").stages[0]
    metrics = folder / "run" / "metrics.jsonl"
    curve = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    verdict = replay([r for r in curve if "embedding_cosine" in r], CollapseGuard(after_step=stage.warmup_step_count))
    last = curve[-1] if curve else {}
    return {"collapsed": verdict is not None, **({"collapse": verdict} if verdict else {}),
            **{key: last[key] for key in ("loss", "chance_loss", "embedding_cosine") if key in last}}


def record_train_seconds(folder: Path, seconds: float, resumed: bool) -> None:
    """The training time of a run that went start to finish in one process; a resumed run's time (this process's
    share only, and the steps lost to the interruption not counted) is no figure to compare, so it has none."""
    target = folder / "train_seconds"
    if resumed:
        target.unlink(missing_ok=True)
        (folder / "train_resumed").write_text("trained across several processes: no comparable training time\n")
    else:
        target.write_text(f"{seconds:.1f}\n")


def evaluate(args, model_dir: Path) -> dict:
    import torch

    from llm2emb.evaluate import load_beir, load_sts
    from llm2emb.evaluate.data import subsample_corpus
    from llm2emb.evaluate.retrieval import evaluate_retrieval
    from llm2emb.evaluate.runner import load_model
    from llm2emb.evaluate.sts import evaluate_sts

    dtype = getattr(torch, args.eval_dtype)
    model = load_model(model_dir, max_length=args.eval_max_length, torch_dtype=dtype)
    started = time.perf_counter()
    scores: dict = {}
    for task, split in (("stsb", "test"), ("stsb-dev", "dev")):
        if task in args.tasks:
            sts = load_sts(DATA / "stsb" / f"{split}.tsv")
            scores[task] = round(evaluate_sts(model, sts, batch_size=64).main, 2)
    if "scifact" in args.tasks:
        scifact = load_beir(DATA / "scifact", "test")
        if args.corpus_sample:
            scifact = subsample_corpus(scifact, args.corpus_sample)
        scores["scifact"] = round(evaluate_retrieval(model, scifact, batch_size=16).main, 2)
        scores["documents"] = len(scifact.documents)
    return {**scores, "eval_seconds": round(time.perf_counter() - started, 1)}


def run_job(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    spec = next(s for s in args.systems if system_name(s) == args.job)
    folder = out / run_name(args.job, args.seed, args.row_seed)
    rows_file = write_rows(args, out, args.row_seed)
    record: dict = {}
    if is_st(args.job):
        model_dir = train_st(args, spec, args.seed, rows_file, folder)
    else:
        model_dir = train_llm2emb(args, spec, args.seed, rows_file, folder)
        record = training_record(folder)
    scores = evaluate(args, model_dir)
    seconds = float((folder / "train_seconds").read_text()) if (folder / "train_seconds").is_file() else None
    result = {"system": args.job, "spec": spec, "seed": args.seed, "row_seed": args.row_seed, **scores, **record,
              "train_seconds": seconds, "steps": args.steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "eval_max_length": args.eval_max_length,
              "corpus_sample": args.corpus_sample, "threads": args.threads}
    (folder / result_name(args)).write_text(json.dumps(result, indent=2) + "\n")
    prune(folder, args.keep_models)
    print(json.dumps(result))


def prune(folder: Path, keep_models: bool) -> None:
    """Drop what a scored run no longer needs: its checkpoints (1.6 GB each for SmolLM2 with Adam's state; a sweep
    of sixty runs filled the disk) and, unless `keep_models`, its model (the curve and recipe stay)."""
    import shutil

    for path in [folder / "trainer", *(folder / "run" / "stages").glob("*/checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)
    if not keep_models:
        for path in (folder / "model", folder / "run" / "model", folder / "run" / "stages"):
            shutil.rmtree(path, ignore_errors=True)


# ---- orchestration and reporting ------------------------------------------------------------------------------


def run_all(args, argv=None) -> list[dict]:
    out = Path(args.out)
    jobs = []
    for seed, row_seed in runs(args):
        write_rows(args, out, row_seed)
        for spec in args.systems:
            name = run_name(system_name(spec), seed, row_seed)
            if not (out / name / result_name(args)).is_file():
                row_args = ["--row-seed", str(row_seed)] if row_seed is not None else []
                jobs.append(Job(name, ["--job", system_name(spec), "--seed", str(seed), *row_args]))
    run_jobs("scripts.compare_recipes", jobs, without_reporting(sys.argv[1:] if argv is None else argv), args.jobs, out,
             args.threads)
    return collected(args)


def collected(args) -> list[dict]:
    """The result rows under --out of every (system, run) asked for, each with the file it came from."""
    out = Path(args.out)
    rows = []
    for seed, row_seed in runs(args):
        for spec in args.systems:
            path = out / run_name(system_name(spec), seed, row_seed) / result_name(args)
            if path.is_file():
                rows.append({**json.loads(path.read_text()), "source": str(path)})
    return rows


def read_rows(paths: list[str]) -> list[dict]:
    """The result rows of committed JSONL files, in order."""
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows


def score_keys(results: list[dict]) -> list[str]:
    return [task for task in TASKS if any(task in r for r in results)]


def spread_cell(values: list[float]) -> str:
    """worst / median / best (spread) over a system's scored runs."""
    if not values:
        return "-"
    return f"{min(values):.2f} / {np.median(values):.2f} / {max(values):.2f} ({max(values) - min(values):.2f})"


def table(results: list[dict], systems: list[str], baselines: list[str] | None = None) -> str:
    """Per system: runs, the runs the collapse guard stops, and worst / median / best (spread) of each score over its
    runs (stopped ones too, scored from their last weights); then, for each llm2emb system, its worst run minus the
    median run of each sentence-transformers system, where a run the guard stops counts as failed ("collapsed")."""
    keys = score_keys(results)
    lines = ["| system | runs | collapsed | " + " | ".join(f"{TASKS[k]} worst / median / best (spread)" for k in keys)
             + " | train s/run |", "|---|---|---|" + "---|" * len(keys) + "---|"]
    by_system = {system_name(spec): [r for r in results if r["system"] == system_name(spec)] for spec in systems}
    for spec in systems:
        mine = by_system[system_name(spec)]
        if not mine:
            continue
        collapsed = sum(bool(r.get("collapsed")) for r in mine)
        cells = [spread_cell([r[k] for r in mine if k in r]) for k in keys]
        seconds = [r["train_seconds"] for r in mine if r.get("train_seconds")]
        time_cell = f"{np.mean(seconds):.0f}" if seconds else "-"
        lines.append(f"| `{spec}` | {len(mine)} | {collapsed} | " + " | ".join(cells) + f" | {time_cell} |")
    baselines = [name for name in by_system if is_st(name) and by_system[name] and name in (baselines or by_system)]
    contenders = [name for name in by_system if not is_st(name) and by_system[name]]
    if baselines and contenders:
        lines += ["", "| llm2emb worst run minus the baseline's median run | " + " | ".join(TASKS[k] for k in keys)
                  + " |", "|---|" + "---|" * len(keys)]
        for name in contenders:
            for baseline in baselines:
                cells = []
                for key in keys:
                    # a stopped run counts as failed; a run not scored on this task (other --tasks) does not count
                    ours = [-np.inf if r.get("collapsed") else r[key] for r in by_system[name]
                            if key in r or r.get("collapsed")]
                    theirs = [r[key] for r in by_system[baseline] if key in r]
                    gap = min(ours) - np.median(theirs) if theirs and ours else None
                    cells.append("-" if gap is None else ("collapsed" if not np.isfinite(gap) else f"{gap:+.2f}"))
                lines.append(f"| `{name}` vs `{baseline}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], systems: list[str], target: str) -> None:
    """Every run's score per system and task, with a bar at the median; a black x marks the runs the collapse guard
    stops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = score_keys(results)
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    names = [system_name(s) for s in systems]
    for axis, key in zip(axes[0], keys):
        for position, name in enumerate(names):
            runs = [r for r in results if r["system"] == name and key in r]
            values = [r[key] for r in runs]
            stopped = [r[key] for r in runs if r.get("collapsed")]
            axis.scatter([position] * len(values), values, s=12)
            axis.scatter([position] * len(stopped), stopped, s=40, marker="x", color="black")
            if values:
                axis.hlines(np.median(values), position - 0.25, position + 0.25)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_ylabel(f"{TASKS[key]} x100")
    figure.tight_layout()
    figure.savefig(target, dpi=100)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.job:
        run_job(args)
        return
    if args.report:
        results = read_rows(args.report)
        if args.row_seeds is not None:  # only the runs asked for: systems compared on the same row orders
            wanted = set(runs(args))
            results = [r for r in results if (r.get("seed"), r.get("row_seed")) in wanted]
    elif args.collect:
        results = collected(args)
        Path(args.collect).write_text("".join(json.dumps(row) + "\n" for row in results))
    else:
        results = run_all(args, argv)
    text = table(results, args.systems, args.baselines)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    if args.results_block:
        replace_block(args.results_block, text)
    if args.plot:
        plot(results, args.systems, args.plot)


if __name__ == "__main__":
    main()
