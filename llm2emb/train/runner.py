"""`llm2emb train recipe.yaml`: validate, load the data, load the model, apply LoRA, then run the stages in order.

The order matters for users: the recipe and every dataset are checked before the (slow) model load, so a typo
in the last dataset fails in seconds. Each stage is one `ContrastiveTrainer.train()` call with its own
optimizer, schedule and checkpoints under `stages/<i>-<name>/`, starting from the weights the stage before
left in memory; a finished stage leaves a model folder in `stages/<i>-<name>/final`, which is what `--resume`
loads to skip it. The last stage's weights are saved as the run's model folder, `<output_dir>/model`.

Run folder:
    recipe.resolved.yaml   the recipe with every default and inherited key spelled out
    stages/0-<name>/checkpoint-N/, final/
    model/                 the trained model (Embedder.from_pretrained, or plain PEFT on the converted base)
    metrics.jsonl          one line per log event (loss, learning rate, throughput, evaluation scores)
    summary.json, loss.png
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm2emb.config import CONFIG_NAME
from llm2emb.errors import UserError
from llm2emb.files import atomic_path, damaged_file, folder_lock, write_text_atomic
from llm2emb.train.data import StageData
from llm2emb.train.distributed import is_main_process, launched_processes
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.fit import check_fit
from llm2emb.train.objectives import build_objective_data, build_trainer
from llm2emb.train.recipe import (
    LORA_AUTO_MAX_PARAMETERS,
    RESOLVED_NAME,
    LoraSpec,
    Recipe,
    StageSpec,
    format_key_path,
    load_recipe,
    save_resolved,
)
from llm2emb.train.remine import with_mined_negatives

logger = logging.getLogger(__name__)
# Raised inside transformers/peft for every step's checkpointing query: noise for users of this runner.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
TRAINER_STATE = "trainer_state.json"
RESUME_IGNORED_KEYS = {"eval", "logging_steps", "report_to", "save_total_limit"}
"""Keys a resumed run may change: they do not affect the weights."""


@dataclass
class TrainSummary:
    """What a finished run reports: where the model is, and how fast and how big the run was."""

    output_dir: str
    model_dir: str
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    peak_memory_mb: float = 0.0
    stages: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second,
                "samples_per_second": self.samples_per_second}

    def format(self) -> str:
        return (f"trained {self.steps} steps in {self.seconds:.0f}s: {self.samples_per_second:.1f} samples/s, "
                f"{self.tokens_per_second:.0f} tokens/s, peak memory {self.peak_memory_mb:.0f} MiB -> {self.model_dir}")


# ---- entry points --------------------------------------------------------------------------------------------


def train(
    recipe_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    callbacks: list[TrainerCallback] | tuple = (),
) -> TrainSummary:
    """Validate the recipe (with `--set` overrides) and run it; see `run_recipe`."""
    return run_recipe(load_recipe(recipe_path, overrides), resume=resume, callbacks=callbacks)


def check_recipe(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Validate the recipe and load every dataset and the tokenizer, without the model's weights: a dry run for
    `--check`, which also says how each dataset's prompts fit `max_length` (see llm2emb.train.fit)."""
    from llm2emb.model import load_prompt_tokenizer

    recipe = load_recipe(recipe_path, overrides)
    lines = [f"{recipe_path}: valid; output_dir {recipe.output_dir}"]
    stage_data = [build_objective_data(stage, index, recipe.on_bad_rows, recipe.seed)
                  for index, stage in enumerate(recipe.stages)]
    Evaluator.from_recipe(recipe)
    tokenizer = load_prompt_tokenizer(recipe.model.base, recipe.model.pooling, recipe.model.max_length)
    for index, (stage, data) in enumerate(zip(recipe.stages, stage_data)):
        lines.append(f"stages[{index}] {stage.name}: {stage.max_steps} steps of {stage.batch_size}, "
                     f"{len(data.batch_sampler)} batches per epoch")
        fits = check_fit(stage, index, data, tokenizer, stage.max_length or recipe.model.max_length,
                         count_truncated=True)
        for position, part in enumerate(data.parts):
            line = f"  datasets[{position}] {Path(part.spec.path).name}: {len(part.rows)} rows"
            line += f" ({part.skipped} skipped)" if part.skipped else ""
            lines.append(line + (f"; {fits[position].format()}" if fits else ""))
    return "\n".join(lines)


def run_recipe(recipe: Recipe, resume: bool = False, callbacks: list[TrainerCallback] | tuple = ()) -> TrainSummary:
    """Train every stage of a validated recipe; with `resume`, continue a run from its last checkpoint."""
    check_hardware(recipe)
    root = Path(recipe.output_dir)
    lock = folder_lock(root, "output_dir") if is_main_process() else contextlib.nullcontext()
    with lock:
        return _run_locked(recipe, root, resume, callbacks)


def _run_locked(recipe: Recipe, root: Path, resume: bool, callbacks) -> TrainSummary:
    """The run, while this process holds output_dir. Nothing is written before the model is loaded and every
    dataset's prompts are known to fit: a run that fails before its first step leaves the folder as it was."""
    continuing = _check_output(recipe, root, resume)
    world_size = launched_processes()
    stage_data = [
        build_objective_data(stage, index, recipe.on_bad_rows, recipe.seed, world_size)
        for index, stage in enumerate(recipe.stages)
    ]
    evaluator = Evaluator.from_recipe(recipe)  # loads evaluation data: its errors also come before the model
    set_seed(recipe.seed)  # LoRA and trainable poolers initialise from the seed
    embedder = load_embedder(recipe)
    for index, (stage, data) in enumerate(zip(recipe.stages, stage_data)):
        check_fit(stage, index, data, embedder.prompt_tokenizer, stage.max_length or recipe.model.max_length)
    if is_main_process():
        _start_output(recipe, root, continuing)
    summary = TrainSummary(output_dir=str(root), model_dir=str(root / "model"))
    log = MetricsLog(root / METRICS_NAME, enabled=is_main_process())
    if evaluator and recipe.eval.at_start and not continuing and is_main_process():
        summary.evaluations.append(evaluator.run(embedder, log, stage="start", step=0))
    started = time.perf_counter()
    weights_from: Path | None = None
    for index, (stage, data) in enumerate(zip(recipe.stages, stage_data)):
        stage_dir = root / "stages" / f"{index}-{stage.name}"
        final = stage_dir / "final"
        if (final / "llm2emb.json").is_file():
            weights_from = final  # finished in an earlier run: skip it, keep its weights for the next stage
            continue
        if weights_from is not None:
            embedder.load_weights(weights_from)
            weights_from = None
        if stage.mine is not None:  # hard negatives from the weights this stage starts from
            data = with_mined_negatives(stage, index, data, embedder, stage_dir, recipe.on_bad_rows, recipe.seed)
        checkpoint = last_checkpoint(stage_dir) if continuing else None
        stats = run_stage(recipe, index, stage, data, embedder, stage_dir, checkpoint, log, evaluator, callbacks)
        summary.stages.append(stats)
        if is_main_process():
            embedder.save_pretrained(final, overwrite=True)
    if weights_from is not None:
        embedder.load_weights(weights_from)
    summary.seconds = time.perf_counter() - started
    summary.steps = sum(s["steps"] for s in summary.stages)
    summary.samples = sum(s["samples"] for s in summary.stages)
    summary.tokens = sum(s["tokens"] for s in summary.stages)
    summary.peak_memory_mb = peak_memory_mb()
    if is_main_process():
        embedder.save_pretrained(root / "model", overwrite=True)
        if evaluator and recipe.eval.at_end:
            summary.evaluations.append(evaluator.run(embedder, log, stage="end", step=summary.steps))
        write_text_atomic(root / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2) + "\n")
        plot_loss(root / METRICS_NAME, root / "loss.png")
    return summary


# ---- setup -------------------------------------------------------------------------------------------------------


def check_hardware(recipe: Recipe) -> None:
    """Fail in one line, before any loading, when the recipe needs hardware this machine lacks."""
    if recipe.quantization != "none" and not torch.cuda.is_available():
        raise UserError(f"quantization: {recipe.quantization} (QLoRA through bitsandbytes) needs a CUDA GPU; "
                        "none is visible (set quantization: none to train on the CPU)")
    if recipe.bf16 and not torch.cuda.is_available() and not _cpu_supports_bf16():
        raise UserError("bf16: this CPU has no bfloat16 support; set bf16: false")


def _cpu_supports_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16) @ torch.zeros(1, 1, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def holds_run(root: Path) -> bool:
    """Whether `root` holds training worth keeping: a complete checkpoint, a finished stage or a saved model.

    A run that failed or was killed before its first checkpoint holds nothing: the next run starts over in it.
    """
    stages = root / "stages"
    if (root / "model" / CONFIG_NAME).is_file():
        return True
    return stages.is_dir() and any(
        (stage / "final" / CONFIG_NAME).is_file() or last_checkpoint(stage, quiet=True) is not None
        for stage in stages.iterdir() if stage.is_dir()
    )


def _check_output(recipe: Recipe, root: Path, resume: bool) -> bool:
    """Whether this run continues an earlier one (`--resume` on a folder that holds one). Refuses a fresh run on a
    folder holding a run, and a resume whose training keys changed. Writes nothing."""
    if not holds_run(root):
        return False
    if not resume:
        raise UserError(f"output_dir: {root} already holds a run; pass --resume to continue it or choose another")
    saved = root / RESOLVED_NAME
    if saved.is_file():
        before = yaml.safe_load(saved.read_text())
        now = recipe.model_dump(mode="json")
        changed = [key for key in _diff(before, now) if key[0] not in RESUME_IGNORED_KEYS]
        if changed:
            keys = ", ".join(format_key_path(key) for key in changed[:5])
            raise UserError(f"{root}: the recipe changed since this run started ({keys}); "
                            "resuming would not reproduce it: use a new output_dir")
    return True


def _start_output(recipe: Recipe, root: Path, continuing: bool) -> None:
    """Write the resolved recipe as training is about to start. A fresh start clears what an earlier attempt that
    never reached a checkpoint left (its metrics, stage folders without checkpoints, half-saved model folders)."""
    if not continuing:
        (root / METRICS_NAME).unlink(missing_ok=True)
        shutil.rmtree(root / "stages", ignore_errors=True)
    for staging in [*root.glob(".model.*"), *root.glob("stages/*/.final.*")]:  # save_pretrained killed mid-write
        shutil.rmtree(staging, ignore_errors=True)
    save_resolved(recipe, root)


def _diff(a: Any, b: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for name in dict.fromkeys([*a, *b]) for key in _diff(a.get(name), b.get(name), (*prefix, name))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [key for i, (x, y) in enumerate(zip(a, b)) for key in _diff(x, y, (*prefix, i))]
    return [] if a == b else [prefix]


def load_embedder(recipe: Recipe):
    """The Embedder of `model:`, with LoRA (and a 4/8-bit base for QLoRA) applied as the recipe says."""
    from llm2emb.model import Embedder

    spec = recipe.model
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    quantization = None if recipe.quantization == "none" else recipe.quantization
    embedder = Embedder.from_pretrained(spec.base, pooling=spec.pooling, attention=spec.attention,
                                        torch_dtype=getattr(torch, dtype), quantization=quantization)
    embedder.config.max_length = spec.max_length
    lora = resolve_lora(recipe, embedder)
    if lora is not None:
        apply_lora(embedder, recipe, lora)
    if recipe.gradient_checkpointing:
        embedder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            embedder.backbone.enable_input_require_grads()
    embedder.pooler.requires_grad_(embedder.pooler.trainable)
    return embedder.train()


def resolve_lora(recipe: Recipe, embedder) -> LoraSpec | None:
    """The adapter to train, or None to train every weight; `lora: auto` decides by the base's size (see Recipe)."""
    if recipe.lora != "auto":
        return recipe.lora
    parameters = sum(p.numel() for p in embedder.backbone.parameters())
    full = recipe.quantization == "none" and parameters < LORA_AUTO_MAX_PARAMETERS
    if is_main_process():
        print(f"lora: auto -> {'full fine-tuning' if full else 'a LoRA adapter'} "
              f"({parameters / 1e6:.0f}M parameters)", file=sys.stderr)
    return None if full else LoraSpec()


def apply_lora(embedder, recipe: Recipe, lora: LoraSpec) -> None:
    """Wrap the backbone in a PEFT LoRA model; with a quantized base, prepare it for k-bit training first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    backbone = embedder.backbone
    if recipe.quantization != "none":
        backbone = prepare_model_for_kbit_training(
            backbone, use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none")
    try:
        embedder.backbone = get_peft_model(backbone, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None


def last_checkpoint(stage_dir: Path, quiet: bool = False) -> str | None:
    """The newest intact checkpoint. Checkpoints are renamed into place once complete, so a crash mid-save leaves
    none half-written; a file damaged later (a full disk, a copy cut short) makes its checkpoint skipped, with a
    one-line notice naming the file, in favour of the one before."""
    if not stage_dir.is_dir():
        return None
    numbered = sorted(
        (path for path in stage_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.name.rpartition("-")[2].isdigit()),
        key=lambda p: int(p.name.rpartition("-")[2]), reverse=True,
    )
    for position, path in enumerate(numbered):
        problem = damaged_file(path) if (path / TRAINER_STATE).is_file() else f"{TRAINER_STATE} is missing"
        if problem is None:
            return str(path)
        if not quiet:
            fallback = numbered[position + 1].name if position + 1 < len(numbered) else "no checkpoint (stage restarts)"
            logger.warning("%s: %s; using %s", path, problem, fallback)
    return None


# ---- one stage ---------------------------------------------------------------------------------------------------


def training_arguments(recipe: Recipe, stage: StageSpec, stage_dir: Path, world_size: int) -> TrainingArguments:
    """The HF TrainingArguments of one stage (checked against transformers 5.23's signature)."""
    return TrainingArguments(
        output_dir=str(stage_dir),
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size // world_size,
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        bf16=recipe.bf16,
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        report_to=[name for name in available_reporters(recipe.report_to) if name != "tensorboard"] or ["none"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # a recipe's batch_size is the global contrastive batch: each process gets a slice of the same batch
        accelerator_config={"split_batches": True},
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )


def available_reporters(wanted: list[str]) -> list[str]:
    """Trainer integrations that are installed; tensorboard is optional."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    kept = [name for name in wanted if name != "none" and importlib.util.find_spec(modules.get(name, name)) is not None]
    for name in set(wanted) - set(kept) - {"none"}:
        logger.warning("report_to: %s is not installed; not reporting to it", name)
    return kept


def run_stage(
    recipe: Recipe, index: int, stage: StageSpec, data: StageData, embedder, stage_dir: Path,
    checkpoint: str | None, log: MetricsLog, evaluator: Evaluator | None, callbacks,
) -> dict:
    """Train one stage (from `checkpoint` when resuming); returns its step, sample and token counts."""
    world_size = launched_processes()
    args = training_arguments(recipe, stage, stage_dir, world_size)
    # contrastive (with the stage's loss options), simcse or mntp: see llm2emb.train.objectives
    trainer = build_trainer(stage, index, embedder, args, data, stage.max_length or recipe.model.max_length)
    trainer.remove_callback(PrinterCallback)  # Trainer picks it when the log level is quiet: dicts, no bar
    trainer.remove_callback(ProgressCallback)
    progress = StageProgress(stage.name, index, len(recipe.stages))
    trainer.add_callback(progress)
    trainer.add_callback(MetricsCallback(log, stage.name))
    if "tensorboard" in available_reporters(recipe.report_to):
        trainer.add_callback(tensorboard_callback(Path(recipe.output_dir) / "tensorboard" / f"{index}-{stage.name}"))
    if evaluator and recipe.eval.every_steps:
        trainer.add_callback(EvalCallback(evaluator, embedder, log, stage.name, recipe.eval.every_steps))
    for callback in callbacks:
        trainer.add_callback(callback)
    start_step, start_tokens = 0, 0
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
        start_step, start_tokens = state["global_step"], state.get("num_input_tokens_seen", 0)
        logger.warning("stage %s: resuming from %s", stage.name, checkpoint)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as exc:  # the trainer's message names the intact checkpoint; add which stage
        raise NonFiniteLossError(f"stages[{index}] ({stage.name}): {exc}") from None
    finally:
        progress.close()
    steps = trainer.state.global_step - start_step
    return {
        "name": stage.name,
        "steps": steps,
        "samples": steps * stage.batch_size,
        "tokens": trainer.state.num_input_tokens_seen - start_tokens,
        "seconds": time.perf_counter() - started,
        "final_loss": _last_loss(trainer.state.log_history),
    }


def _last_loss(history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses[-1] if losses else None


# ---- progress, metrics, evaluation ------------------------------------------------------------------------


class StageProgress(ProgressCallback):
    """Trainer's progress bar, with loss, learning rate and throughput in the bar instead of printed dicts."""

    def __init__(self, name: str, index: int, count: int):
        super().__init__()
        self.label = f"stage {index + 1}/{count} {name}"
        self.throughput = Throughput()

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label)
        self.throughput.start(state)

    def close(self) -> None:
        """End the bar when training stops early (on_train_end, which closes it otherwise, never comes)."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs or "loss" not in logs:
            return
        self.training_bar.set_postfix(
            loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
            tok_s=f"{self.throughput.tokens_per_second(state):.0f}",
        )


class Throughput:
    """Tokens per second since this `train()` call began (a resumed call counts from its own start)."""

    def start(self, state) -> None:
        self.time, self.tokens = time.perf_counter(), state.num_input_tokens_seen

    def tokens_per_second(self, state) -> float:
        return (state.num_input_tokens_seen - self.tokens) / max(time.perf_counter() - self.time, 1e-9)


def tensorboard_callback(log_dir: Path) -> TrainerCallback:
    """HF's TensorBoard callback writing under the run folder, minus the model-config text it would try to render
    (it calls `model.config.to_json_string()`, which an Embedder's config, not a transformers config, lacks)."""
    from transformers.integrations import TensorBoardCallback

    class EmbedderTensorBoard(TensorBoardCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            kwargs.pop("model", None)
            super().on_train_begin(args, state, control, **kwargs)

    callback = EmbedderTensorBoard()
    callback.logging_dir = str(log_dir)
    return callback


class MetricsLog:
    """Append-only JSONL of log events; a resumed run appends after the interrupted one's lines."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class MetricsCallback(TrainerCallback):
    """Every Trainer log event, with its stage, step and throughput, into metrics.jsonl."""

    def __init__(self, log: MetricsLog, stage: str):
        self.log, self.stage, self.throughput = log, stage, Throughput()

    def on_train_begin(self, args, state, control, **kwargs):
        self.throughput.start(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        record = {"stage": self.stage, "step": state.global_step, "time": time.time(), **logs}
        if "loss" in logs:
            record["tokens_per_second"] = self.throughput.tokens_per_second(state)
        self.log.write(record)


@dataclass
class Evaluator:
    """STS files and BEIR folders of `eval:`, loaded once, scored with llm2emb.evaluate."""

    sts: list
    beir: list
    batch_size: int

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Evaluator | None:
        if not recipe.eval.sts and not recipe.eval.beir:
            return None
        from llm2emb.evaluate import load_beir, load_sts
        from llm2emb.evaluate.data import subsample_corpus

        beir = []
        for spec in recipe.eval.beir:
            data = load_beir(spec.path, spec.split)
            beir.append((subsample_corpus(data, spec.corpus_sample) if spec.corpus_sample else data, spec.instruction))
        return cls(
            sts=[load_sts(spec.path) for spec in recipe.eval.sts],
            beir=beir,
            batch_size=recipe.eval.batch_size,
        )

    def run(self, embedder, log: MetricsLog, stage: str, step: int) -> dict:
        from llm2emb.evaluate.runner import run_tasks

        results = run_tasks(embedder, self.sts, self.beir, batch_size=self.batch_size)
        scores = {f"eval/{r.task}/{r.main_score}": round(r.main, 2) for r in results}
        record = {"stage": stage, "step": step, "time": time.time(), **scores}
        log.write(record)
        print(f"eval ({stage}, step {step}): " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in scores.items()),
              file=sys.stderr)
        return record


class EvalCallback(TrainerCallback):
    """Evaluation every N optimizer steps of a stage (main process only; encode restores training mode)."""

    def __init__(self, evaluator: Evaluator, embedder, log: MetricsLog, stage: str, every: int):
        self.evaluator, self.embedder, self.log, self.stage, self.every = evaluator, embedder, log, stage, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self.evaluator.run(self.embedder, self.log, self.stage, state.global_step)


# ---- the end of a run ----------------------------------------------------------------------------------------


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def plot_loss(metrics: Path, target: Path) -> Path | None:
    """The loss curve of every stage (matplotlib is optional: without it, no picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve (pip install 'llm2emb[plot]')")
        return None
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        if "loss" in record and math.isfinite(record["loss"]):
            curves.setdefault(record["stage"], {})[record["step"]] = record["loss"]  # a resumed step replaces
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage, points in curves.items():
        steps = sorted(points)
        axis.plot([offset + s for s in steps], [points[s] for s in steps], label=stage)
        offset += steps[-1]
    axis.set_xlabel("optimizer step (all stages)")
    axis.set_ylabel("contrastive loss")
    axis.legend()
    figure.tight_layout()
    with atomic_path(target) as staging, staging.open("wb") as handle:
        figure.savefig(handle, dpi=100, format="png")
    plt.close(figure)
    return target
