"""Every shipped recipe in recipes/ validates (schema, data paths, pooling names) without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2emb.train.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_the_documented_recipes_exist():
    names = {path.name for path in RECIPES}
    assert {"quickstart.yaml", "mistral-7b-nvembed.yaml", "qwen2.5-7b.yaml", "llama3-8b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_validates(path, shared_data):
    recipe = load_recipe(path)  # dataset and evaluation paths point into ../shared/data
    assert path.read_text().startswith("# "), "each recipe starts with a comment saying what it reproduces"
    assert recipe.stages and all(stage.max_steps > 0 for stage in recipe.stages)
