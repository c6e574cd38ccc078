"""`llm2emb train` on the command line: a run, --check, and each refusal as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llm2emb.cli import main

RECIPE = """\
    model: {base: BASE, max_length: 24}
    lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
    output_dir: OUT
    logging_steps: 1
    stages:
      - name: pairs
        max_steps: 2
        batch_size: 4
        learning_rate: 1.0e-3
        datasets: [{path: DATA}]
"""


def write_recipe(directory: Path, base: Path, data: str = "pairs.jsonl") -> Path:
    rows = [{"query": f"where is the {w}?", "positive": f"The {w} is here."}
            for w in ["cat", "dog", "man", "chef", "mat", "street", "enzyme", "protein"]]
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / "recipe.yaml"
    text = textwrap.dedent(RECIPE).replace("BASE", str(base)).replace("OUT", str(directory / "run"))
    path.write_text(text.replace("DATA", data))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llm2emb train: error: "), err
    return lines[0]


def test_train_prints_the_summary_and_writes_the_model(tiny_qwen2, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_qwen2)
    assert main(["train", str(recipe), "--set", "stages[0].max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trained 1 steps in ") and out.strip().endswith(str(tmp_path / "run" / "model"))
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
    assert main(["train", str(recipe), "--set", "stages[0].max_steps=1"]) == 2
    assert "already holds a run; pass --resume" in one_line_error(capsys)


def test_check_prints_the_data_summary_without_training(tiny_qwen2, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_qwen2)
    assert main(["train", str(recipe), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"{recipe}: valid; output_dir {tmp_path / 'run'}" in out
    assert ("stages[0] pairs: 2 steps of 4, 2 batches per epoch\n"
            "  datasets[0] pairs.jsonl: 8 rows; prompt 0 tokens of max_length 24, 0 of 8 rows truncated") in out
    assert not (tmp_path / "run").exists()


def test_the_quickstart_checks_offline_with_its_documented_override(shared_data, capsys):
    """README's first command, as this project's machines run it (no hub): the override swaps in ../shared/data."""
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    assert main(["train", str(recipes / "quickstart.yaml"), "--check",
                 "--set", f"@{recipes / 'overrides' / 'quickstart-offline.yaml'}"]) == 0
    out = capsys.readouterr().out
    assert "stages[0] retrieval: 12 steps of 32, 28 batches per epoch\n  datasets[0] scifact: 919 rows" in out
    assert "stages[1] similarity: 48 steps of 32, 183 batches per epoch\n  datasets[0] triplets.jsonl: 5883 rows" in out


def test_missing_dataset_is_one_line_naming_the_key(tiny_qwen2, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_qwen2, data="missing.jsonl")
    assert main(["train", str(recipe)]) == 2
    assert one_line_error(capsys) == (
        f"llm2emb train: error: {recipe}:10: stages[0].datasets[0].path: missing.jsonl: file not found "
        "(for a dataset from the hub set format: hf)"
    )


@pytest.mark.parametrize(("override", "fragment"), [
    ("stages[0].batch_size=16", "stages[0].datasets[0]: 8 usable rows, fewer than stages[0].batch_size (16)"),
    ("stages[0].gradcache_chunk=3", "stages[0].gradcache_chunk: 3 must divide batch_size (4)"),
    ("lora.target_modules=[nope]", "lora.target_modules: "),
])
def test_bad_settings_are_one_line(tiny_qwen2, tmp_path, capsys, override, fragment):
    recipe = write_recipe(tmp_path, tiny_qwen2)
    assert main(["train", str(recipe), "--set", override]) == 2
    assert fragment in one_line_error(capsys)


def test_quantization_on_cpu_is_a_clear_error(tiny_qwen2, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    recipe = write_recipe(tmp_path, tiny_qwen2)
    assert main(["train", str(recipe), "--set", "quantization=4bit"]) == 2
    line = one_line_error(capsys)
    assert "quantization: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_with_torchrun_write_one_model_and_every_rank_state(tiny_qwen2, tmp_path):
    """`torchrun -m llm2emb.cli train` (gloo on the CPU): one summary line, checkpoints hold both ranks' RNG."""
    recipe = write_recipe(tmp_path, tiny_qwen2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm2emb.cli", "train",
               str(recipe), "--set", "save_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("trained ")]
    assert len(summaries) == 1 and summaries[0].startswith("trained 2 steps"), result.stdout
    checkpoint = tmp_path / "run" / "stages" / "0-pairs" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= {
        p.name for p in checkpoint.iterdir()}
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_distil_from_a_teacher_with_its_own_tokenizer(tiny_qwen2, tiny_st_teacher, tmp_path):
    """Raw texts travel in the batches of each process to its teacher; the vectors are gathered with the batch."""
    recipe = write_recipe(tmp_path, tiny_qwen2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm2emb.cli", "train",
               str(recipe), "--set", f"stages[0].teacher.model={tiny_st_teacher}", "--set",
               "stages[0].teacher.infonce_weight=0.0", "--set", "stages[0].gradcache_chunk=1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(0 <= loss < 100 for loss in losses)  # the KL term alone, logged once per step
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
