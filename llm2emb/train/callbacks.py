"""What runs beside the Trainer's loop: the progress bar, throughput, metrics.jsonl, TensorBoard and evaluation during
training."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from llm2emb.train.recipe import EvalSpec


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
    def from_spec(cls, spec: EvalSpec) -> Evaluator | None:
        """The recipe's `eval:` data, loaded; None when it names none."""
        if not spec.sts and not spec.beir:
            return None
        from llm2emb.evaluate.data import load_beir, load_mteb, load_sts, load_sts_table, subsample_corpus

        beir = []
        for task in spec.beir:
            data = load_beir(task.path, task.split) if task.format == "beir" else load_mteb(task.path, task.split)
            beir.append((subsample_corpus(data, task.corpus_sample) if task.corpus_sample else data, task.instruction))
        return cls(
            sts=[load_sts(task.path) if task.format == "tsv" else load_sts_table(task.path, task.subset, task.split)
                 for task in spec.sts],
            beir=beir,
            batch_size=spec.batch_size,
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
