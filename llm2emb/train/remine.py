"""A stage's `mine:` key: hard negatives mined with the weights the stage starts from (ANCE's refresh, done once
per stage), added to the stage's data as one more dataset.

The rows are written to `<stage folder>/mined.jsonl` before the stage trains. A resumed stage finds the file and
reuses it instead of mining again with weights that have moved on, so the resumed run sees the same data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm2emb.commands.mine import mine
from llm2emb.train.data import StageData, load_rows, read_pairs
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.recipe_file import format_key_path

logger = logging.getLogger(__name__)

MINED_NAME = "mined.jsonl"


def with_mined_negatives(stage: StageSpec, index: int, data: StageData, embedder, stage_dir: Path,
                         on_bad_rows: str, seed: int) -> StageData:
    """`data` plus the rows mined for this stage (mined now with `embedder`, or read back when resuming)."""
    spec = stage.mine
    target = Path(stage_dir) / MINED_NAME
    if target.is_file():
        logger.warning("stage %s: reusing %s", stage.name, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        was_training = embedder.training
        stats = mine(embedder, spec.corpus, target, queries=spec.queries, qrels=spec.qrels,
                     pairs=read_pairs(spec.pairs, format_key_path(("stages", index, "mine", "pairs"))) if spec.pairs else None,
                     top_k=spec.top_k, rank_window=spec.rank_window, margin=spec.margin,
                     num_negatives=spec.num_negatives, instruction=spec.instruction, batch_size=spec.batch_size)
        embedder.train(was_training)
        logger.warning("stage %s: %s", stage.name, stats.format(target))
    mined = DatasetSpec.model_validate({"path": str(target), "weight": spec.weight})
    key = format_key_path(("stages", index, "mine"))
    part = load_rows(mined, on_bad_rows, key)
    return StageData([*data.parts, part], stage.batch_size, stage.hard_negatives, seed)
