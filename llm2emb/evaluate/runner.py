"""`llm2emb eval`: load one model (llm2emb folder, base model, or sentence-transformers folder) and run every task.

The same function backs the CLI and the benchmark scripts, so a number in benchmarks/RESULTS.md is exactly what a
user's `llm2emb eval` prints.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.evaluate.cache import EmbeddingCache, model_fingerprint
from llm2emb.evaluate.data import BeirData, StsData, load_beir, load_sts, subsample_corpus
from llm2emb.evaluate.encoders import as_encoder
from llm2emb.evaluate.limit import limit_task
from llm2emb.evaluate.longembed import long_task
from llm2emb.evaluate.metrics import DEFAULT_RETRIEVAL_METRICS
from llm2emb.evaluate.results import TaskResult
from llm2emb.evaluate.retrieval import evaluate_retrieval
from llm2emb.evaluate.sts import evaluate_sts
from llm2emb.readers import document_text, read_jsonl


@dataclass
class EvalReport:
    """All results of one model, with what is needed to reproduce and compare them."""

    model: str
    results: list[TaskResult]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0


def is_sentence_transformers_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "modules.json").is_file() and not (path / "llm2emb.json").is_file()


def load_model(
    model: str | Path,
    pooling: str | dict[str, Any] | None = None,
    attention: str | None = None,
    max_length: int | None = None,
    torch_dtype: Any = None,
    trust_remote_code: bool = False,
    rope_scaling: str | dict[str, Any] | None = None,
    device: str | None = None,
) -> Any:
    """An Embedder for llm2emb folders and base models; a SentenceTransformer for exported / ST folders; on
    `device` (default: the CPU)."""
    if is_sentence_transformers_folder(model):
        if pooling is not None or attention is not None or rope_scaling is not None:
            raise UserError(f"{model}: a sentence-transformers folder fixes its own pooling, attention and RoPE")
        from sentence_transformers import SentenceTransformer

        check_sentence_transformers_weights(Path(model))
        try:
            st = SentenceTransformer(str(model), device=device or "cpu", trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise UserError(f"{model}: uses custom modules; pass --trust-remote-code to load them") from None
            raise
        if max_length is not None:
            st.max_seq_length = max_length
        if torch_dtype is not None:
            st.to(torch_dtype)
        return st
    from llm2emb.model.embedder import Embedder

    embedder = Embedder.from_pretrained(model, pooling=pooling, attention=attention, torch_dtype=torch_dtype,
                                        rope_scaling=rope_scaling, device=device)
    if max_length is not None:
        if max_length < 2:
            raise UserError(f"max_length must be at least 2, got {max_length}")
        embedder.config.max_length = max_length
    return embedder


def check_sentence_transformers_weights(folder: Path) -> None:
    """The checks of llm2emb.model.weights for a sentence-transformers folder, which sentence-transformers would load with
    random weights wherever its files lack them: no damaged file, and its transformer module's checkpoint whole
    (loaded once more for transformers' loading report; a teacher or an evaluated model pays that once)."""
    import json

    from transformers import AutoModel

    from llm2emb.model.weights import load_checked, refuse_damaged

    refuse_damaged(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        paths = [m["path"] for m in modules if "Transformer" in m.get("type", "")]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{folder}/modules.json: not a sentence-transformers module list") from None
    for path in paths:
        if (folder / path / "config.json").is_file():
            load_checked(AutoModel, folder / path)


def environment() -> dict[str, Any]:
    """Machine, date and library versions, recorded next to every measured number."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    versions = {}
    for package in ("llm2emb", "torch", "transformers", "peft", "sentence-transformers", "mteb", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def evaluate_model(
    model: Any,
    sts: Sequence[str | Path | StsData] = (),
    beir: Sequence[str | Path | BeirData] = (),
    split: str = "test",
    query_instruction: str | None = None,
    sts_instruction: str | None = None,
    batch_size: int = 32,
    metrics: Sequence[str] = DEFAULT_RETRIEVAL_METRICS,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    name: str | None = None,
    progress: Any = None,
    precision: str = "float32",
    rescore: int | None = None,
) -> EvalReport:
    """Evaluate a loaded model (Embedder, SentenceTransformer, or any TextEncoder) on STS files and BEIR folders.

    Data is loaded (and validated) before any encoding, so a typo in the last path fails in a second, not after an
    hour. `progress`, when given, is called with each TaskResult as it completes.
    """
    if not sts and not beir:
        raise UserError("nothing to evaluate: give at least one --sts FILE or --beir DIR")
    sts_data = [item if isinstance(item, StsData) else load_sts(item) for item in sts]
    beir_data = [item if isinstance(item, BeirData) else load_beir(item, split) for item in beir]
    cache = EmbeddingCache(cache_dir) if use_cache else None
    results = run_tasks(model, sts_data, [(data, query_instruction) for data in beir_data], batch_size=batch_size,
                        sts_instruction=sts_instruction, metrics=metrics, cache=cache, progress=progress,
                        precision=precision, rescore=rescore)
    settings = {
        "split": split,
        "query_instruction": query_instruction,
        "sts_instruction": sts_instruction,
        "batch_size": batch_size,
        "precision": precision,
        "rescore": rescore,
        **_model_settings(model),
    }
    return EvalReport(model=name or type(model).__name__, results=results, settings=settings,
                      environment=environment())


def run_tasks(
    model: Any,
    sts: Sequence[StsData],
    beir: Sequence[tuple[BeirData, str | None]],
    batch_size: int = 32,
    sts_instruction: str | None = None,
    metrics: Sequence[str] = DEFAULT_RETRIEVAL_METRICS,
    cache: EmbeddingCache | None = None,
    progress: Any = None,
    precision: str = "float32",
    rescore: int | None = None,
) -> list[TaskResult]:
    """The one evaluation loop (`llm2emb eval` and evaluation during training): each loaded STS task, then each
    BEIR task with its own query instruction; document embeddings go through `cache` when given."""
    encoder = as_encoder(model, batch_size)
    fingerprint = model_fingerprint(model) if cache is not None and beir else None
    results = []
    for data in sts:
        results.append(evaluate_sts(encoder, data, instruction=sts_instruction))
        if progress:
            progress(results[-1])
    for data, instruction in beir:
        results.append(
            evaluate_retrieval(
                encoder, data, query_instruction=instruction, metrics=metrics,
                cache=cache, fingerprint=fingerprint, cache_settings=_model_settings(model),
                precision=precision, rescore=rescore,
            )
        )
        if progress:
            progress(results[-1])
    return results


def _model_settings(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "pooling"):
        return {"attention": config.attention, "pooling": config.pooling, "max_length": config.max_length,
                "default_query_instruction": config.default_query_instruction}
    if hasattr(model, "max_seq_length"):
        return {"max_length": model.max_seq_length}
    return {}


LONG_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
LONG_METRICS = ("ndcg@1", "ndcg@10")
LIMIT_METRICS = ("recall@2", "recall@10", "recall@100")
LONG_PROMPT_ROOM = 64
"""Tokens beyond the longest synthetic document kept for special tokens and a document template."""


def run_eval(
    model: str | Path,
    pooling: str | dict[str, Any] | None = None,
    attention: str | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
    corpus_sample: int | None = None,
    rope_scaling: str | dict[str, Any] | None = None,
    long_tasks: Sequence[str] = (),
    long_lengths: Sequence[int] = LONG_LENGTHS,
    long_documents: int = 50,
    haystack: str | Path | None = None,
    limit: str | None = None,
    torch_dtype: str | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> EvalReport:
    """Load `model` and evaluate it (see `evaluate_model` for the task arguments).

    `corpus_sample` shrinks each BEIR corpus to that many documents (all relevant ones kept; see
    `subsample_corpus`) for quick runs on slow machines. `long_tasks` (passkey, needle) adds LongEmbed's synthetic
    tasks at each of `long_lengths` tokens (llm2emb.evaluate.longembed; needle hides its facts in `haystack`, a
    JSONL or text file of prose), scored by nDCG@1; without `max_length` the model's limit is raised to fit them.
    `limit` (small | large) adds the LIMIT task (llm2emb.evaluate.limit), scored by recall@2/10/100.
    `torch_dtype` (float32 | bfloat16 | float16; default the model's own) is recorded in the report's settings.
    """
    split = kwargs.pop("split", "test")
    sts = [load_sts(path) for path in kwargs.pop("sts", ())]  # data errors surface before the slow model load
    beir = [load_beir(path, split) for path in kwargs.pop("beir", ())]
    if corpus_sample:
        beir = [subsample_corpus(data, corpus_sample) for data in beir]
    if not sts and not beir and not long_tasks and not limit:
        raise UserError("nothing to evaluate: give at least one --sts FILE, --beir DIR, --long TASK or --limit SIZE")
    extra_tasks = [([limit_task(limit)], LIMIT_METRICS)] if limit else []
    prose = read_haystack(haystack) if "needle" in long_tasks else None
    if long_tasks and max_length is not None and max_length < max(long_lengths):
        raise UserError(f"--max-length {max_length} would cut the {max(long_lengths)}-token documents of --long")
    import torch

    start = time.perf_counter()
    loaded = load_model(model, pooling=pooling, attention=attention, max_length=max_length,
                        torch_dtype=getattr(torch, torch_dtype) if torch_dtype else None,
                        trust_remote_code=trust_remote_code, rope_scaling=rope_scaling, device=device)
    load_seconds = time.perf_counter() - start
    if long_tasks:
        if max_length is None:
            fit_length(loaded, max(long_lengths) + LONG_PROMPT_ROOM)
        extra_tasks += [([long_task(kind, loaded.tokenizer, length, long_documents, haystack=prose)
                          for kind in long_tasks for length in long_lengths], LONG_METRICS)]
    report = evaluate_model(loaded, sts=sts, beir=beir, split=split, name=str(model), **kwargs) if sts or beir else None
    own = {k: v for k, v in kwargs.items() if k not in ("metrics", "query_instruction")}
    for tasks, metrics in extra_tasks:  # generated tasks: their own metrics, the model's own instruction
        extra = evaluate_model(loaded, beir=tasks, name=str(model), metrics=metrics, **own)
        if report is None:
            report = extra
        else:
            report.results += extra.results
    report.settings.update(rope_scaling=rope_scaling, long_documents=long_documents if long_tasks else None,
                           dtype=torch_dtype, device=device)
    report.load_seconds = load_seconds
    report.settings["corpus_sample"] = corpus_sample
    return report


def fit_length(model: Any, length: int) -> None:
    """Raise a loaded model's token limit to `length` (an Embedder's max_length or a SentenceTransformer's)."""
    if hasattr(model, "max_seq_length"):
        model.max_seq_length = max(model.max_seq_length, length)
    else:
        model.config.max_length = max(model.config.max_length, length)


def read_haystack(path: str | Path | None) -> list[str]:
    """Prose for the needle task: a JSONL file (`text`, after `title`) or a text file, one passage per line."""
    if path is None:
        raise UserError("--long needle hides its facts in real prose: give --haystack FILE (JSONL or text lines)")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--haystack {path}: file not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        return [document_text(row) for row in read_jsonl(path, ("text",))]
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--haystack {path}: no text")
    return lines
