"""Every shipped recipe in recipes/ validates (schema, data paths, pooling names) and its data reads as the recipe
says (formats, columns, enough rows for a batch), without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2emb.train.data import build_stage_data
from llm2emb.train.objectives import read_texts
from llm2emb.train.recipe_file import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
OFFLINE = Path(__file__).resolve().parents[2] / "recipes" / "overrides"


def offline(path: Path) -> list[str]:
    """The documented override that points a hub recipe at this project's offline copy (no hub in CI)."""
    overrides = OFFLINE / f"{path.stem}-offline.yaml"
    return [f"@{overrides}"] if overrides.is_file() else []


def test_the_documented_recipes_exist():
    names = {path.name for path in RECIPES}
    assert {"quickstart.yaml", "mistral-7b-nvembed.yaml", "qwen2.5-7b.yaml", "llama3-8b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_validates(path, shared_data):
    recipe = load_recipe(path, offline(path))  # dataset and evaluation paths point into ../shared/data
    assert path.read_text().startswith("# "), "each recipe starts with a comment saying what it reproduces"
    for index, stage in enumerate(recipe.stages):
        if stage.objective == "contrastive" and stage.datasets:
            data = build_stage_data(stage, index, recipe.on_bad_rows, recipe.seed)  # raises on a row it cannot read
            item = data[0]
            assert item["query"].strip() and item["positive"].strip()
            assert len(item["negatives"]) == stage.hard_negatives
        else:
            for spec in stage.datasets:
                assert len(read_texts(spec, recipe.on_bad_rows)) >= stage.batch_size


def test_the_quickstart_reads_only_what_a_fresh_clone_has():
    """No path into this project's offline copy: the base is a registry asset, the data hub datasets."""
    path = RECIPES[0].parent / "quickstart.yaml"
    recipe = load_recipe(path)
    assert recipe.model.base == "smollm2-135m"
    sources = [(spec.path, spec.format) for stage in recipe.stages for spec in stage.datasets]
    sources += [(spec.path, spec.format) for spec in (*recipe.eval.sts, *recipe.eval.beir)]
    assert sources and all(fmt in ("hf", "mteb") and not Path(p).exists() for p, fmt in sources), sources
    assert offline(path), "the offline override is documented in the recipe and tested here"
