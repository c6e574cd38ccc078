"""Recipe validation: key paths and YAML lines in every error, --set overrides, stage inheritance, saving."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from llm2emb.errors import UserError
from llm2emb.train.recipe import RESOLVED_NAME
from llm2emb.train.recipe_file import apply_override, load_recipe, parse_key_path, save_resolved


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    model:
      base: Qwen/Qwen2.5-7B
      pooling: {type: latent_attention, num_latents: 512, num_heads: 8}
      max_length: 512
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
    output_dir: OUT
    stages:
      - name: retrieval
        max_steps: 1000
        batch_size: 512
        gradcache_chunk: 32
        learning_rate: 1.0e-4
        temperature: 0.02
        hard_negatives: 7
        datasets:
          - path: data/pairs.jsonl
            instruction: "Given a web search query, retrieve relevant passages"
            weight: 1.0
      - name: blend
        datasets:
          - {path: data/pairs.jsonl, in_batch_negatives: false}
"""


def errors_of(path: Path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_issue_recipe_validates_and_later_stages_inherit(recipe_dir):
    recipe = load_recipe(write(recipe_dir, GOOD.replace("OUT", str(recipe_dir / "run"))))
    first, second = recipe.stages
    assert second.batch_size == 512 and second.hard_negatives == 7 and second.max_steps == 1000
    assert second.datasets[0].in_batch_negatives is False and second.datasets[0].instruction is None
    assert Path(first.datasets[0].path) == (recipe_dir / "data" / "pairs.jsonl").resolve()
    assert first.datasets[0].format == "jsonl"
    assert recipe.model.base == "Qwen/Qwen2.5-7B"


def test_errors_name_key_path_and_line(recipe_dir):
    text = GOOD.replace("OUT", "out").replace("path: data/pairs.jsonl, in", "path: data/nope.jsonl, in")
    text = text.replace("gradcache_chunk: 32", "gradcache_chunk: 30").replace("r: 16,", "r: 16, rank: 3,")
    text = text.replace("temperature: 0.02", "temprature: 0.02")
    message = errors_of(write(recipe_dir, text))
    assert "\n" not in message  # every problem, on one line
    lines = message.split("; ")
    assert any(line.endswith("recipe.yaml:21: stages[1].datasets[0].path: data/nope.jsonl: file not found "
                             "(for a dataset from the hub set format: hf)") for line in lines), message
    assert any("recipe.yaml:5: lora.rank: unknown key" in line for line in lines), message
    assert any("recipe.yaml:13: stages[0].temprature: unknown key (did you mean 'temperature'?)" in line
               for line in lines), message


def test_impossible_values(recipe_dir):
    text = GOOD.replace("OUT", "out").replace("gradcache_chunk: 32", "gradcache_chunk: 30")
    text = text.replace("hard_negatives: 7", "hard_negatives: -1")
    message = errors_of(write(recipe_dir, text))
    assert "recipe.yaml:14: stages[0].hard_negatives: Input should be greater than or equal to 0 (got -1)" in message
    message = errors_of(write(recipe_dir, GOOD.replace("OUT", "out").replace("gradcache_chunk: 32", "gradcache_chunk: 30")))
    assert "recipe.yaml:11: stages[0].gradcache_chunk: 30 must divide batch_size (512)" in message
    message = errors_of(write(recipe_dir, GOOD.replace("OUT", "out").replace("hard_negatives: 7", "hard_negatives: 0")))
    assert "stages[1].datasets[0].in_batch_negatives: false with hard_negatives: 0" in message


def test_model_checks_before_loading(recipe_dir):
    text = GOOD.replace("OUT", "out").replace("num_heads: 8", "heads: 8")
    assert "model.pooling: latent_attention pooling takes no heads" in errors_of(write(recipe_dir, text))
    text = GOOD.replace("OUT", "out").replace("base: Qwen/Qwen2.5-7B", "base: ./missing.gguf")
    assert "recipe.yaml:2: model.base: ./missing.gguf: not found" in errors_of(write(recipe_dir, text))
    path = write(recipe_dir, GOOD.replace("OUT", "out"))
    assert "quantization: 4bit needs lora" in errors_of(path, ["quantization=4bit", "lora=null"])
    message = errors_of(path, ["model.attention=causal", "model.causal_sink=true"])
    assert "model.causal_sink: the causal sink is part of bidirectional attention; model.attention is causal" in message


def test_set_overrides(recipe_dir):
    path = write(recipe_dir, GOOD.replace("OUT", "out"))
    recipe = load_recipe(path, ["stages.0.max_steps=7", "stages[1].batch_size=64", "model.attention=causal",
                                "stages[1].gradcache_chunk=16", "eval.sts=[{path: data/pairs.jsonl}]"])
    assert recipe.stages[0].max_steps == 7 and recipe.stages[1].max_steps == 7  # inherited after the override
    assert recipe.stages[1].batch_size == 64 and recipe.stages[0].batch_size == 512
    assert recipe.model.attention == "causal"
    assert recipe.eval.sts[0].path.endswith("pairs.jsonl")
    assert "recipe.yaml (--set): stages[0].max_steps: Input should be a valid integer" in errors_of(
        path, ["stages.0.max_steps=many"])
    assert "(--set): lora.rr: unknown key" in errors_of(path, ["lora.rr=3"])
    assert "index 5 out of range (2 items)" in errors_of(path, ["stages[5].max_steps=3"])
    with pytest.raises(UserError, match="expected key.path=value"):
        apply_override({}, "stages.0.max_steps")
    assert parse_key_path("stages[1].datasets.0.path") == ("stages", 1, "datasets", 0, "path")


def test_an_overrides_file_sets_its_key_paths_in_order(recipe_dir):
    path = write(recipe_dir, GOOD.replace("OUT", "out"))
    overrides = recipe_dir / "offline.yaml"
    overrides.write_text("# the data of one machine\nstages[0].datasets:\n  - path: data/pairs.jsonl\n"
                         "    weight: 3.0\nstages[0].datasets[0].weight: 2.0\neval.sts: [{path: data/pairs.jsonl}]\n")
    recipe = load_recipe(path, [f"@{overrides}", "stages[1].max_steps=9"])
    assert recipe.stages[0].datasets[0].weight == 2.0 and recipe.stages[0].datasets[0].instruction is None
    assert recipe.eval.sts[0].path == str((recipe_dir / "data" / "pairs.jsonl").resolve())  # from the recipe's folder
    assert recipe.stages[1].max_steps == 9
    overrides.write_text("stages[0].max_steps: 5\nstages[4].max_steps: 3\n")
    assert f"{overrides}:2: stages[4].max_steps: stages[4]: index 4 out of range (2 items)" in errors_of(
        path, [f"@{overrides}"])
    overrides.write_text("stages[0].max_steps: many\n")  # the value's error names the key path, as --set's does
    assert "(--set): stages[0].max_steps: Input should be a valid integer" in errors_of(path, [f"@{overrides}"])
    overrides.write_text("- stages[0].max_steps: 5\n")
    assert f"{overrides}: an overrides file is a mapping of key paths to values" in errors_of(path, [f"@{overrides}"])
    assert f"--set @{recipe_dir / 'nope.yaml'}: overrides file not found" in errors_of(path, [f"@{recipe_dir}/nope.yaml"])


def test_evaluation_data_from_the_hub_is_named_not_checked_for_files(recipe_dir):
    path = write(recipe_dir, GOOD.replace("OUT", "out"))
    recipe = load_recipe(path, ["eval.sts=[{path: sentence-transformers/stsb, format: hf, split: test}]",
                                "eval.beir=[{path: mteb/scifact, format: mteb, corpus_sample: 400}]"])
    assert (recipe.eval.sts[0].path, recipe.eval.beir[0].path) == ("sentence-transformers/stsb", "mteb/scifact")
    assert "eval.sts[0].path: sentence-transformers/stsb: file not found (for a dataset from the hub set format: hf)" \
        in errors_of(path, ["eval.sts=[{path: sentence-transformers/stsb}]"])
    assert "eval.beir[0].path: mteb/scifact: BEIR folder not found (for a task from the hub set format: mteb)" \
        in errors_of(path, ["eval.beir=[{path: mteb/scifact}]"])


def test_yaml_syntax_error_has_line(recipe_dir):
    path = recipe_dir / "broken.yaml"
    path.write_text("model:\n  base: x\nstages: [\n  - a: b\n")
    assert errors_of(path).startswith(f"{path}:")


def test_save_resolved_round_trips(recipe_dir):
    recipe = load_recipe(write(recipe_dir, GOOD.replace("OUT", str(recipe_dir / "run"))))
    saved = save_resolved(recipe)
    assert saved == recipe_dir / "run" / RESOLVED_NAME
    data = yaml.safe_load(saved.read_text())
    assert data["stages"][1]["batch_size"] == 512  # inherited values spelled out
    again = load_recipe(saved)
    assert again == recipe


def test_lora_auto_is_the_default_and_a_bad_value_names_one_branch(recipe_dir):
    text = GOOD.replace("OUT", "out").replace("    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}\n", "")
    assert load_recipe(write(recipe_dir, text)).lora == "auto"
    bad = GOOD.replace("OUT", "out").replace("lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}",
                                              "lora: automatic")
    assert errors_of(write(recipe_dir, bad)).endswith("recipe.yaml:5: lora: Input should be 'auto' (got 'automatic')")
    wrong_key = GOOD.replace("OUT", "out").replace("r: 16,", "rank: 16,")
    assert errors_of(write(recipe_dir, wrong_key)).endswith("recipe.yaml:5: lora.rank: unknown key")


def test_warmup_is_a_step_count_or_a_share_of_max_steps(recipe_dir, tmp_path):
    from llm2emb.train.setup import training_arguments

    path = write(recipe_dir, GOOD.replace("OUT", "out"))
    recipe = load_recipe(path, ["stages.0.max_steps=51"])
    stage = recipe.stages[0]
    assert stage.warmup_steps == 0.1 and stage.warmup_step_count == 5  # the default: a tenth, rounded down
    assert training_arguments(recipe, stage, tmp_path, world_size=1, learning_rate=4e-4).warmup_steps == 5
    assert load_recipe(path, ["stages.0.max_steps=9"]).stages[0].warmup_step_count == 0  # tiny runs: none
    assert load_recipe(path, ["stages.0.warmup_steps=7"]).stages[0].warmup_step_count == 7
    assert load_recipe(path, ["stages.0.warmup_steps=0.5"]).stages[1].warmup_step_count == 500  # inherited share
    assert "stages[0].warmup_steps: 1000 (1000 steps) leaves no step after warmup: max_steps is 1000" in errors_of(
        path, ["stages.0.warmup_steps=1000"])
    assert "stages[0].warmup_steps: 1.5: a whole number of steps (>= 0) or a share of max_steps below 1" in errors_of(
        path, ["stages.0.warmup_steps=1.5"])


def test_fsdp_sharding_reaches_the_trainer_and_is_refused_without_gpus(recipe_dir, tmp_path, monkeypatch):
    from llm2emb.train import setup

    recipe = load_recipe(write(recipe_dir, GOOD.replace("OUT", "out")), ["sharding=fsdp"])
    arguments = setup.training_arguments(recipe, recipe.stages[0], tmp_path, world_size=1, learning_rate=4e-4, layer_class="Qwen2DecoderLayer")
    assert arguments.fsdp and arguments.fsdp_config["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    assert arguments.fsdp_config["version"] == 2  # transformers' FSDP1 settings would be ignored: FSDP2's only
    assert arguments.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"  # what the runner saves the model from
    plain = load_recipe(write(recipe_dir, GOOD.replace("OUT", "out")))
    assert not setup.training_arguments(plain, plain.stages[0], tmp_path, world_size=1, learning_rate=4e-4).fsdp
    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sharding: fsdp needs CUDA GPUs"):
        setup.check_hardware(recipe.quantization, recipe.bf16, recipe.sharding)
    setup.check_hardware(plain.quantization, plain.bf16, plain.sharding)
