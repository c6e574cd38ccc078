"""Training data: rows from files, BEIR folders and the hub; batches of one dataset each; the batch collator.

Rows become `query, positive, negatives, instruction` with whatever format they came in. JSONL, CSV and
TSV are read line by line (the stdlib keeps line numbers, so a malformed row fails as `file:line: what`);
parquet and hub datasets come through `datasets`, with row numbers. `on_bad_rows: skip` skips and counts.

Batches: every batch holds rows of one dataset (in-batch negatives from the same task; a per-dataset
`in_batch_negatives` switch is meaningful only then). The order depends only on seed and epoch, so the
HF Trainer's "skip the first N batches" on resume reproduces the interrupted run's batches exactly.

Hard negatives (k per query, drawn again each epoch from seed, epoch and row): a row with at least k
negatives gives k distinct ones; a row with fewer repeats its own in a fixed cycle; a row with none gets
the positives of k other rows of its dataset (random negatives), skipping texts equal to its own positive.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from llm2emb.commands.mine import Pair
from llm2emb.errors import UserError
from llm2emb.model.tokenization import locate_texts
from llm2emb.readers import BadRow, delimited_records, jsonl_records, qrel_pairs
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.recipe_file import format_key_path

logger = logging.getLogger(__name__)

COLUMNS = ("query", "positive", "negatives", "instruction", "positive_span")
ID_MASK = (1 << 63) - 1


@dataclass
class LoadedDataset:
    rows: datasets.Dataset
    spec: DatasetSpec
    skipped: int = 0
    locations: list[str] | None = None
    """Where each row came from (`file:line`, `qrels: query q, document d`), for errors found after loading."""

    def where(self, row: int) -> str:
        return self.locations[row] if self.locations else f"{self.spec.path}: row {row + 1}"


# ---- reading rows ------------------------------------------------------------------------------------------


def load_rows(spec: DatasetSpec, on_bad_rows: str = "fail", key: str = "dataset", graded: bool = False) -> LoadedDataset:
    """Read a dataset of a recipe into rows with the columns query, positive, negatives, instruction; `graded`
    (a cosent/angle stage) keeps every scored pair with its `score` instead of thresholding."""
    source = records(spec)
    if spec.format == "scored_pairs":
        builder = functools.partial(_scored_pair, graded=graded)
    else:
        builder = _triple
    names = (*COLUMNS, "score") if graded else COLUMNS
    columns: dict[str, list] = {name: [] for name in names}
    locations: list[str] = []
    skipped, first_problem = 0, None
    try:
        for where, record in source:
            try:
                row = builder(record, spec, where)
            except BadRow as exc:
                if on_bad_rows == "fail":
                    raise UserError(f"{exc} (set on_bad_rows: skip to skip such rows)") from None
                skipped += 1
                first_problem = first_problem or str(exc)
                continue
            if row is None:
                continue
            for name in names:
                columns[name].append(row[name])
            locations.append(where)
            if spec.max_rows is not None and len(columns["query"]) >= spec.max_rows:
                break
    except BadRow as exc:  # unreadable input (not a single row): never skippable
        raise UserError(str(exc)) from None
    if skipped:
        logger.warning("%s: skipped %d bad row(s), the first: %s", spec.path, skipped, first_problem)
    if not columns["query"]:
        raise UserError(f"{key}: {spec.path}: no usable rows")
    return LoadedDataset(datasets.Dataset.from_dict(columns, features=row_features(graded)), spec, skipped, locations)


def row_features(graded: bool = False) -> datasets.Features:
    """The columns of training rows, whatever their source (`COLUMNS`, and `score` in a graded stage)."""
    return datasets.Features(
        {
            "query": datasets.Value("string"),
            "positive": datasets.Value("string"),
            "negatives": datasets.List(datasets.Value("string")),
            "instruction": datasets.Value("string"),
            "positive_span": datasets.List(datasets.Value("int64")),
            **({"score": datasets.Value("float32")} if graded else {}),
        }
    )


def records(spec: DatasetSpec) -> Iterator[tuple[str, dict]]:
    """(location, raw record) pairs for every row of the source."""
    path = Path(spec.path)
    if spec.format == "jsonl":
        return jsonl_records(path)
    if spec.format in ("csv", "tsv", "scored_pairs"):
        delimiter = "," if spec.format == "csv" else "\t"
        return delimited_records(path, delimiter)
    if spec.format in ("beir", "mteb"):
        return _retrieval_records(spec)
    if spec.format == "parquet":
        table = datasets.Dataset.from_parquet(str(path))
        return ((f"{path}: row {i + 1}", record) for i, record in enumerate(table))
    if spec.format == "hf":
        from llm2emb.hf_tables import load_table

        table = load_table(spec.path, spec.subset, spec.split)
        return ((f"{spec.path}[{spec.split}]: row {i + 1}", record) for i, record in enumerate(table))
    raise UserError(f"{spec.path}: unsupported format {spec.format}")


def _retrieval_records(spec: DatasetSpec) -> Iterator[tuple[str, dict | BadRow]]:
    """(query, positive) for every qrel with score > 0 of a BEIR folder or an MTEB-layout task; documents are
    `title text` as in BEIR and MTEB."""
    from llm2emb.evaluate.data import load_beir, load_mteb

    if spec.format == "beir":
        task = load_beir(spec.path, spec.split, evaluated=False)
        qrels_where = str(Path(spec.path) / "qrels" / f"{spec.split}.tsv")
    else:
        task = load_mteb(spec.path, spec.split, evaluated=False)
        qrels_where = f"{spec.path} (default, {spec.split})"
    pairs = qrel_pairs(dict(zip(task.query_ids, task.queries)), dict(zip(task.doc_ids, task.documents)), task.qrels,
                       qrels_where)
    for where, query, document in pairs:
        yield where, document if isinstance(document, BadRow) else {"query": query, "positive": document}


def _field(record: dict, spec: DatasetSpec, name: str) -> Any:
    return record.get(spec.columns.get(name, name))


def _text(record: dict, spec: DatasetSpec, name: str, where: str) -> str:
    value = _field(record, spec, name)
    column = spec.columns.get(name, name)
    if value is None:
        raise BadRow(f"{where}: missing field {column!r}")
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{where}: field {column!r} must be a non-empty string, got {value!r:.60}")
    return value


def _triple(record: Any, spec: DatasetSpec, where: str) -> dict:
    if isinstance(record, BadRow):
        raise record
    negative = _field(record, spec, "negative")
    negatives = _field(record, spec, "negatives")
    if negative not in (None, "") and negatives not in (None, []):
        raise BadRow(f"{where}: has both 'negative' and 'negatives'; keep one")
    if negatives in (None, ""):
        negatives = [] if negative in (None, "") else [negative]
    if isinstance(negatives, str) and spec.format in ("csv", "tsv"):
        negatives = _json_list(negatives, where)
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise BadRow(f"{where}: 'negatives' must be a list of non-empty strings, got {negatives!r:.60}")
    instruction = _field(record, spec, "instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise BadRow(f"{where}: 'instruction' must be a string, got {instruction!r:.60}")
    positive = _text(record, spec, "positive", where)
    return {
        "query": _text(record, spec, "query", where),
        "positive": positive,
        "negatives": negatives,
        "instruction": instruction or None,
        "positive_span": _span(_field(record, spec, "positive_span"), positive, where, spec.format in ("csv", "tsv")),
    }


def _span(value: Any, positive: str, where: str, in_cell: bool) -> list[int]:
    """A situated positive's [start, end] characters inside `positive` (its context); [] when the row has none."""
    if value in (None, "", []):
        return []
    if isinstance(value, str) and in_cell:
        value = _json_list(value, where, "positive_span")
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in value)):
        raise BadRow(f"{where}: 'positive_span' must be [start, end] character offsets, got {value!r:.60}")
    start, end = value
    if not 0 <= start < end <= len(positive) or not positive[start:end].strip():
        raise BadRow(f"{where}: 'positive_span' {value} is not a non-blank span of the positive "
                     f"({len(positive)} characters)")
    return [start, end]


def _json_list(text: str, where: str, column: str = "negatives") -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise BadRow(f"{where}: '{column}' in a CSV/TSV cell must be a JSON list") from None
    return value


def _scored_pair(record: Any, spec: DatasetSpec, where: str, graded: bool = False) -> dict | None:
    """STS-style `score sentence1 sentence2`: a pair when score >= score_threshold, else no row; with `graded`,
    every pair, with its score."""
    if isinstance(record, BadRow):
        raise record
    names = {name: spec.columns.get(name, name) for name in ("score", "sentence1", "sentence2")}
    missing = [column for column in names.values() if column not in record]
    if missing:
        raise BadRow(f"{where}: missing column(s) {', '.join(missing)} (scored_pairs needs score, sentence1, sentence2)")
    try:
        score = float(record[names["score"]])
    except ValueError:
        raise BadRow(f"{where}: score {record[names['score']]!r} is not a number") from None
    if not math.isfinite(score):
        raise BadRow(f"{where}: score {record[names['score']]!r} is not a finite number")
    if score < spec.score_threshold and not graded:
        return None
    pair = {"query": record[names["sentence1"]], "positive": record[names["sentence2"]]}
    for name, value in pair.items():
        if not value.strip():
            raise BadRow(f"{where}: empty {names['sentence1' if name == 'query' else 'sentence2']}")
    return {**pair, "negatives": [], "instruction": None, "positive_span": [], "score": score}


# ---- a stage's data and its batch order --------------------------------------------------------------------


class MixedBatchSampler(torch.utils.data.Sampler):
    """Batches of global row indices, each from one dataset, datasets mixed by weight.

    Per epoch, dataset d contributes round(weight_d * (rows_d // batch_size)) batches (at least one), cut
    from fresh permutations of its rows (so no row repeats inside a batch); the batches are then shuffled.
    Everything is drawn from numpy generators seeded with (seed, epoch), so the order depends on nothing else.
    """

    drop_last = True  # every batch is full: accelerate reads this when it shards the sampler

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.counts = [max(1, round(w * (n // batch_size))) for n, w in zip(self.sizes, weights)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[list[int]]:
        batches: list[np.ndarray] = []
        for source, (size, count) in enumerate(zip(self.sizes, self.counts)):
            rng = np.random.default_rng([self.seed, self.epoch, source + 1])
            per_permutation = size // self.batch_size
            taken: list[np.ndarray] = []
            while len(taken) < count:
                order = rng.permutation(size)[: per_permutation * self.batch_size]
                taken.extend(order.reshape(per_permutation, self.batch_size)[: count - len(taken)])
            batches.extend(batch + self.offsets[source] for batch in taken)
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(batches))
        for position in order:
            yield batches[position].tolist()


def training_order(sampler: MixedBatchSampler, count: int) -> list[int]:
    """The first `count` row indices in the order training meets them, epoch after epoch (the trainer sets the
    epoch from 0): what another trainer is given, in a sequential sampler, to see exactly llm2emb's batches."""
    order: list[int] = []
    epoch = 0
    while len(order) < count:
        sampler.set_epoch(epoch)
        order.extend(index for batch in sampler for index in batch)
        epoch += 1
    sampler.set_epoch(0)
    return order[:count]


class StageData(torch.utils.data.Dataset):
    """The datasets of one stage behind global indices; items carry k hard negatives for this epoch."""

    def __init__(self, parts: list[LoadedDataset], batch_size: int, hard_negatives: int, seed: int):
        self.parts = parts
        self.hard_negatives = hard_negatives
        self.seed = seed
        sizes = [len(part.rows) for part in parts]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.batch_sampler = MixedBatchSampler(sizes, [part.spec.weight for part in parts], batch_size, seed)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Accelerate calls this on the dataset or on the sampler, depending on wrapping: both share one epoch."""
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        source = bisect.bisect_right(self.offsets, index) - 1
        part = self.parts[source]
        local = index - self.offsets[source]
        row = part.rows[local]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return {
            "query": row["query"],
            "positive": row["positive"],
            "negatives": self._negatives(part, local, row, rng),
            "instruction": row["instruction"] or part.spec.instruction,
            "source": source,
            "in_batch_negatives": part.spec.in_batch_negatives,
            "where": part.where(local),
            "score": row.get("score"),
            "positive_span": tuple(row["positive_span"]) or None,
        }

    def _negatives(self, part: LoadedDataset, local: int, row: dict, rng: np.random.Generator) -> list[str]:
        k, own = self.hard_negatives, row["negatives"]
        if k == 0:
            return []
        if len(own) >= k:
            return [own[i] for i in rng.choice(len(own), size=k, replace=False)]
        if own:
            cycle = [own[i] for i in rng.permutation(len(own))]
            return [cycle[i % len(cycle)] for i in range(k)]
        size = len(part.rows)
        chosen: list[str] = []
        for other in rng.permutation(size)[: 4 * k + 8].tolist():
            text = part.rows[other]["positive"]
            if other != local and text != row["positive"]:
                chosen.append(text)
                if len(chosen) == k:
                    return chosen
        raise UserError(f"{part.spec.path}: cannot find {k} random negatives for a row (too few distinct positives)")


def build_stage_data(
    stage: StageSpec, stage_index: int, on_bad_rows: str, seed: int, world_size: int = 1
) -> StageData:
    """Load every dataset of a stage and check that each can fill a batch."""
    parts = []
    for index, spec in enumerate(stage.datasets):
        key = format_key_path(("stages", stage_index, "datasets", index))
        part = load_rows(spec, on_bad_rows, key, graded=stage.loss != "infonce")
        if len(part.rows) < stage.batch_size:
            raise UserError(
                f"{key}: {len(part.rows)} usable rows, fewer than stages[{stage_index}].batch_size ({stage.batch_size})"
            )
        parts.append(part)
    if stage.batch_size % world_size:
        raise UserError(
            f"stages[{stage_index}].batch_size: {stage.batch_size} must be a multiple of the {world_size} processes"
        )
    return StageData(parts, stage.batch_size, stage.hard_negatives, seed)


def read_pairs(path: str | Path, key: str = "--pairs") -> list[Pair]:
    """Training rows of any format a recipe's dataset reads, as (query, positive, instruction) pairs to mine for."""
    from pydantic import ValidationError

    try:
        spec = DatasetSpec.model_validate({"path": str(path)}, context={"base_dir": Path.cwd()})
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"{key}: {message}") from None
    rows = load_rows(spec, key=key).rows
    return [Pair(r["query"], r["positive"], r["instruction"]) for r in rows]


# ---- collator ------------------------------------------------------------------------------------------------


def text_id(text: str) -> int:
    """Stable 63-bit id of a text (blake2b), equal for equal texts in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & ID_MASK


class ContrastiveCollator:
    """Items of one dataset -> the training batch of docs/CONTRACTS.md (instructions on queries only).

    ``keep_texts``: the batch also carries the raw texts (``texts``: queries, instructions, documents) for a
    teacher that tokenizes them its own way.
    """

    def __init__(self, embedder: Any, max_length: int | None = None, keep_texts: bool = False):
        self.embedder = embedder
        self.max_length = max_length
        self.keep_texts = keep_texts

    def __call__(self, items: list[dict]) -> dict:
        if len({item["source"] for item in items}) != 1:
            raise ValueError("a training batch must come from one dataset (use StageData.batch_sampler)")
        documents = [item["positive"] for item in items] + [n for item in items for n in item["negatives"]]
        spans = [item.get("positive_span") for item in items] + [None] * (len(documents) - len(items))
        queries = [item["query"] for item in items]
        instructions = [item["instruction"] for item in items]
        owners = [*range(len(items)), *(i for i, item in enumerate(items) for _ in item["negatives"])]
        with locate_texts(lambda i: f"{items[i]['where']}: query"):
            query_batch = dict(self.embedder.tokenize(queries, instructions=instructions, max_length=self.max_length))
        with locate_texts(lambda i: f"{items[owners[i]]['where']}: document"):
            document_batch = dict(self.embedder.tokenize(documents, max_length=self.max_length, kind="document",
                                                         spans=spans if any(spans) else None))
        extra: dict[str, Any] = {}
        if items[0]["score"] is not None:  # a cosent/angle stage: the loss ranks pairs by these
            extra["scores"] = torch.tensor([item["score"] for item in items], dtype=torch.float32)
        # A situated positive is its span in context: the teacher (no context) sees the span, and two spans of one
        # document are two documents.
        chunks = [text if span is None else text[span[0]:span[1]] for text, span in zip(documents, spans)]
        keys = [text if span is None else f"{text}\x00{span[0]}:{span[1]}" for text, span in zip(documents, spans)]
        if self.keep_texts:
            extra["texts"] = {"queries": queries, "instructions": instructions, "documents": chunks}
        return {
            **extra,
            "queries": query_batch,
            "documents": document_batch,
            "query_ids": torch.tensor([text_id(text) for text in queries], dtype=torch.long),
            "document_ids": torch.tensor([text_id(key) for key in keys], dtype=torch.long),
            "in_batch_negatives": bool(items[0]["in_batch_negatives"]),
        }
