"""The run folder and the resume policy: what counts as a run, what a resumed run may change, which checkpoint
to continue from (a damaged one is skipped), and the leftovers a crash may have left."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm2emb.errors import UserError
from llm2emb.files import damaged_file
from llm2emb.model.config import CONFIG_NAME
from llm2emb.train.recipe import RESOLVED_NAME, Recipe
from llm2emb.train.recipe_file import format_key_path, save_resolved
from llm2emb.train.reporting import METRICS_NAME

logger = logging.getLogger(__name__)


TRAINER_STATE = "trainer_state.json"


RESUME_IGNORED_KEYS = {"eval", "logging_steps", "report_to", "save_steps", "save_total_limit"}
"""Keys a resumed run may change: they do not affect the weights."""
RESUME_IGNORED_STAGE_KEYS = {"collapse_guard"}
"""Stage keys a resumed run may change: a guard watches the weights, it does not change them."""


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


def check_output(recipe: Recipe, root: Path, resume: bool) -> bool:
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
        changed = [key for key in _diff(before, now) if key[0] not in RESUME_IGNORED_KEYS
                   and not (key[0] == "stages" and len(key) > 2 and key[2] in RESUME_IGNORED_STAGE_KEYS)]
        if changed:
            keys = ", ".join(format_key_path(key) for key in changed[:5])
            raise UserError(f"{root}: the recipe changed since this run started ({keys}); "
                            "resuming would not reproduce it: use a new output_dir")
    return True


def start_output(recipe: Recipe, root: Path, continuing: bool) -> None:
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


def last_checkpoint(stage_dir: Path, quiet: bool = False, before: int | None = None) -> str | None:
    """The newest intact checkpoint (of a step below `before`, when given). Checkpoints are renamed into place once
    complete, so a crash mid-save leaves none half-written; a file damaged later (a full disk, a copy cut short)
    makes its checkpoint skipped, with a one-line notice naming the file, in favour of the one before."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    numbered = sorted(
        (path for path in stage_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.name.rpartition("-")[2].isdigit()
         and (before is None or int(path.name.rpartition("-")[2]) < before)),
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
