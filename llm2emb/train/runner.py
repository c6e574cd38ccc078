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
import shlex
import time
import warnings
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed

from llm2emb.errors import UserError
from llm2emb.files import folder_lock, write_text_atomic
from llm2emb.model.card import TrainingRecord, write_card
from llm2emb.train.callbacks import (
    EvalCallback,
    Evaluator,
    MetricsCallback,
    MetricsLog,
    StageProgress,
    tensorboard_callback,
)
from llm2emb.train.collapse import CollapseError
from llm2emb.train.data import StageData
from llm2emb.train.distributed import is_main_process, launched_processes, wait_for_all_processes
from llm2emb.train.errors import TrainingStopped
from llm2emb.train.fit import check_fit
from llm2emb.train.objectives import build_objective_data, build_trainer
from llm2emb.train.recipe import RESOLVED_NAME, Recipe, StageSpec
from llm2emb.train.recipe_file import load_recipe
from llm2emb.train.remine import with_mined_negatives
from llm2emb.train.reporting import METRICS_NAME, SUMMARY_NAME, TrainSummary, peak_memory_mb, plot_loss
from llm2emb.train.run_folder import TRAINER_STATE, check_output, last_checkpoint, start_output
from llm2emb.train.setup import (
    available_reporters,
    check_hardware,
    load_embedder,
    stage_learning_rate,
    training_arguments,
)

logger = logging.getLogger(__name__)
# Raised inside transformers/peft for every step's checkpointing query: noise for users of this runner.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


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
    from llm2emb.model.folder import load_prompt_tokenizer

    recipe = load_recipe(recipe_path, overrides)
    lines = [f"{recipe_path}: valid; output_dir {recipe.output_dir}"]
    stage_data = [build_objective_data(stage, index, recipe.on_bad_rows, recipe.seed)
                  for index, stage in enumerate(recipe.stages)]
    Evaluator.from_spec(recipe.eval)
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
    check_hardware(recipe.quantization, recipe.bf16, recipe.sharding)
    root = Path(recipe.output_dir)
    lock = folder_lock(root, "output_dir") if is_main_process() else contextlib.nullcontext()
    with lock:
        return _run_locked(recipe, root, resume, callbacks)


def _run_locked(recipe: Recipe, root: Path, resume: bool, callbacks) -> TrainSummary:
    """The run, while this process holds output_dir. Nothing is written before the model is loaded and every
    dataset's prompts are known to fit: a run that fails before its first step leaves the folder as it was."""
    continuing = check_output(recipe, root, resume)
    world_size = launched_processes()
    stage_data = [
        build_objective_data(stage, index, recipe.on_bad_rows, recipe.seed, world_size)
        for index, stage in enumerate(recipe.stages)
    ]
    evaluator = Evaluator.from_spec(recipe.eval)  # loads evaluation data: its errors also come before the model
    set_seed(recipe.seed)  # LoRA and trainable poolers initialise from the seed
    embedder = load_embedder(recipe)
    for index, (stage, data) in enumerate(zip(recipe.stages, stage_data)):
        check_fit(stage, index, data, embedder.prompt_tokenizer, stage.max_length or recipe.model.max_length)
    if is_main_process():
        start_output(recipe, root, continuing)
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
        stats, full_state = run_stage(recipe, index, stage, data, embedder, stage_dir, checkpoint, log, evaluator,
                                      callbacks)
        summary.stages.append(stats)
        if is_main_process():
            embedder.save_pretrained(final, overwrite=True, state_dict=full_state)
        if full_state is not None:
            # FSDP sharded the live model in place: continue (next stage, evaluation, the saved model) from a
            # plain copy with the trained weights, once the main process has written them
            wait_for_all_processes()
            embedder = load_embedder(recipe)
            weights_from = final
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
        write_card(root / "model", embedder.folder_config(), training_record(recipe, root, stage_data, summary))
        plot_loss(root / METRICS_NAME, root / "loss.png")
    return summary


def training_record(recipe: Recipe, root: Path, stage_data: list, summary: TrainSummary) -> TrainingRecord:
    """What the model card says of this run, from what the run itself recorded."""
    commands = [f"--sts {spec.path}" for spec in recipe.eval.sts]
    for spec in recipe.eval.beir:
        command = f"--beir {spec.path} --split {spec.split}"
        if spec.corpus_sample:
            command += f" --corpus-sample {spec.corpus_sample}"
        if spec.instruction:
            command += f" --query-instruction {shlex.quote(spec.instruction)}"
        commands.append(command)
    datasets = [(stage.name, part.spec.path, len(part.rows))
                for stage, data in zip(recipe.stages, stage_data) for part in data.parts]
    return TrainingRecord(recipe_path=str(root / RESOLVED_NAME),
                          resolved_recipe=(root / RESOLVED_NAME).read_text(), datasets=datasets, steps=summary.steps,
                          seconds=summary.seconds, evaluations=summary.evaluations, evaluation_commands=commands)


# ---- setup -------------------------------------------------------------------------------------------------------


# ---- one stage ---------------------------------------------------------------------------------------------------


def run_stage(
    recipe: Recipe, index: int, stage: StageSpec, data: StageData, embedder, stage_dir: Path,
    checkpoint: str | None, log: MetricsLog, evaluator: Evaluator | None, callbacks,
) -> dict:
    """Train one stage (from `checkpoint` when resuming); returns its step, sample and token counts, and under
    FSDP the trained model's full state dict (gathered by every process, held by the main one) to save it from."""
    world_size = launched_processes()
    if checkpoint is not None and recipe.sharding == "fsdp":
        embedder.load_weights(checkpoint)  # a checkpoint is a model folder; loaded before the Trainer shards it
    learning_rate = stage_learning_rate(stage, index, embedder)
    args = training_arguments(recipe, stage, stage_dir, world_size, learning_rate, embedder.decoder_layer_class)
    # contrastive (with the stage's loss options), simcse or mntp: see llm2emb.train.objectives
    trainer = build_trainer(stage, index, embedder, args, data, stage.max_length or recipe.model.max_length)
    if trainer.is_deepspeed_enabled:
        raise UserError("DeepSpeed is not supported: GradCache replays every chunk's forward and calls backward once "
                        "per chunk, while DeepSpeed's engine reduces gradients on each backward and ZeRO-3 "
                        "re-partitions parameters between them (Tevatron#206, FlagEmbedding#1446); use sharding: fsdp")
    if recipe.sharding == "fsdp" and not trainer.is_fsdp_enabled:  # never a silent fall-back to DDP
        raise UserError("sharding: fsdp: accelerate did not enable FSDP for these processes (it shards only "
                        "across GPU processes launched with torchrun or accelerate launch)")
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
    except TrainingStopped as exc:  # the trainer's message names the intact checkpoint; add which stage
        message = f"stages[{index}] ({stage.name}) {exc}; nothing was written to {Path(recipe.output_dir) / 'model'}"
        if isinstance(exc, CollapseError):
            log.write({"event": "collapse", "stage": stage.name, "step": exc.step, "time": time.time(),
                       "loss": round(exc.spread.loss, 4), "chance_loss": exc.spread.chance and round(exc.spread.chance, 4),
                       "embedding_cosine": round(exc.spread.cosine, 4), "message": message})
        exc.args = (message,)
        raise exc from None
    finally:
        progress.close()
    steps = trainer.state.global_step - start_step
    full_state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    stats = {
        "name": stage.name,
        "steps": steps,
        "samples": steps * stage.batch_size,
        "tokens": trainer.state.num_input_tokens_seen - start_tokens,
        "seconds": time.perf_counter() - started,
        "learning_rate": learning_rate,
        "final_loss": _last_loss(trainer.state.log_history),
        **(trainer.collapse_guard.report() if getattr(trainer, "collapse_guard", None) else {}),
        "sharding": "fsdp" if trainer.is_fsdp_enabled else ("ddp" if world_size > 1 else "none"),
    }
    return stats, full_state


def _last_loss(history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses[-1] if losses else None


# ---- progress, metrics, evaluation ------------------------------------------------------------------------


# ---- the end of a run ----------------------------------------------------------------------------------------


