"""`llm2emb train` at the command line, killed with SIGKILL at the worst moments, then `--resume`d: the weights end
equal to an uninterrupted run's. Also the output_dir lock, runs that fail before training, and damaged checkpoints.

Each run is a subprocess of `crash_cli.py` (written below): the real CLI with one hook that kills the process at a
chosen point: during a step (after backward, before the optimizer step), half-way through writing a checkpoint file,
or half-way through writing a stage's final model folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2emb.commands.convert import convert

CRASH_CLI = '''
import os, signal, sys
point = os.environ.get("CRASH_AT", "")
kind, _, number = point.partition(":")
import safetensors.torch, torch

def die():
    os.kill(os.getpid(), signal.SIGKILL)

saving_step = [None]
real_torch_save, real_save_file = torch.save, safetensors.torch.save_file

def torch_save(obj, f, *args, **kwargs):
    if kind == "checkpoint" and saving_step[0] == int(number) and ".checkpoint-staging" in str(f):
        real_torch_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(os.path.getsize(f) // 2)
        die()
    return real_torch_save(obj, f, *args, **kwargs)

def save_file(tensors, filename, *args, **kwargs):
    if kind == "final" and "/.final." in str(filename):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        die()
    return real_save_file(tensors, filename, *args, **kwargs)

torch.save, safetensors.torch.save_file = torch_save, save_file

from llm2emb.train.trainer import ContrastiveTrainer
real_step, real_checkpoint = ContrastiveTrainer.training_step, ContrastiveTrainer._save_checkpoint

def training_step(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    if kind == "step" and self.state.global_step + 1 == int(number):
        die()
    if kind == "hold":
        open(number, "w").close()
        import time
        time.sleep(120)
    return loss

def save_checkpoint(self, *args, **kwargs):
    saving_step[0] = self.state.global_step
    return real_checkpoint(self, *args, **kwargs)

ContrastiveTrainer.training_step, ContrastiveTrainer._save_checkpoint = training_step, save_checkpoint

from llm2emb.cli import main
sys.exit(main(sys.argv[1:]))
'''

RECIPE = """\
    model: {base: emb, max_length: 32}
    lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj]}
    output_dir: run
    logging_steps: 1
    save_steps: 1
    report_to: []
    stages:
      - name: first
        max_steps: 3
        batch_size: 4
        learning_rate: 5.0e-3
        temperature: 0.1
        hard_negatives: 1
        datasets: [{path: triplets.jsonl, instruction: Find the sentence}]
      - name: second
        max_steps: 3
        datasets: [{path: triplets.jsonl}]
"""
SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital"]
PLACES = ["street", "kitchen", "mat", "garden"]


@pytest.fixture(scope="module")
def base(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "converted"
    convert(str(tiny_qwen2), out, pooling={"type": "latent_attention", "num_latents": 4, "num_heads": 2}, dtype="float32")
    return out


def workspace(directory: Path, base: Path) -> Path:
    rows = [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far from the {p}."}
            for s in SUBJECTS for p in PLACES]
    (directory / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "emb").symlink_to(base)
    (directory / "crash_cli.py").write_text(CRASH_CLI)
    recipe = directory / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE))
    return recipe


def run(directory: Path, *args: str, crash: str = "", wait: bool = True):
    env = {**os.environ, "CRASH_AT": crash, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, str(directory / "crash_cli.py"), "train", str(directory / "recipe.yaml"), *args]
    if not wait:
        return subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=600)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(model_dir / "adapter_model.safetensors")),
            **{f"pooler.{k}": v for k, v in load_file(str(model_dir / "pooling.safetensors")).items()}}


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    """The uninterrupted run's model folder."""
    directory = tmp_path_factory.mktemp("reference")
    workspace(directory, base)
    result = run(directory)
    assert result.returncode == 0, result.stderr[-2000:]
    return directory / "run" / "model"


@pytest.mark.parametrize("crash", ["step:2", "checkpoint:2", "final"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(base, reference, tmp_path, crash):
    workspace(tmp_path, base)
    killed = run(tmp_path, crash=crash)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model").exists()
    refused = run(tmp_path)
    assert refused.returncode == 2 and "already holds a run; pass --resume" in refused.stderr.splitlines()[-1]
    resumed = run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(tmp_path / "run" / "model", reference)
    leftovers = [p for p in (tmp_path / "run").rglob(".*") if p.name != ".lock"]
    assert leftovers == [] or all(p.name == ".checkpoint-staging" for p in leftovers), leftovers


def test_a_damaged_latest_checkpoint_is_skipped_with_a_notice(base, reference, tmp_path):
    workspace(tmp_path, base)
    assert run(tmp_path, crash="step:3").returncode == -signal.SIGKILL  # checkpoints 1 and 2 of stage 1 on disk
    stage = tmp_path / "run" / "stages" / "0-first"
    optimizer = stage / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # as a full disk or a cut copy leaves it
    resumed = run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    notices = [line for line in resumed.stderr.splitlines() if "checkpoint-2" in line and "optimizer.pt" in line]
    assert len(notices) == 1 and "truncated or corrupt; using checkpoint-1" in notices[0]
    assert_same_weights(tmp_path / "run" / "model", reference)


def test_a_live_run_holds_its_output_dir_and_a_dead_one_does_not(base, tmp_path):
    workspace(tmp_path, base)
    started = tmp_path / "started"
    live = run(tmp_path, crash=f"hold:{started}", wait=False)
    try:
        deadline = time.time() + 300
        while not started.exists():
            assert live.poll() is None and time.time() < deadline, live.stderr.read() if live.poll() else "timeout"
            time.sleep(0.5)
        second = run(tmp_path, "--resume")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"llm2emb train: error: output_dir: {tmp_path / 'run'} is in use by a running process (pid {live.pid})")
    finally:
        live.kill()
        live.wait()
    # killed before its first checkpoint: nothing to resume, and nothing locks the folder
    again = run(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()


def test_a_run_that_fails_before_training_leaves_nothing_behind(base, tmp_path):
    recipe = workspace(tmp_path, base)
    data = tmp_path / "triplets.jsonl"
    good = data.read_text()
    data.write_text(good + '{"query": "broken row", "positive": ""}\n')
    failed = run(tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith(f"llm2emb train: error: {data}:33: field 'positive'")
    assert not (tmp_path / "run").exists()
    # an instruction that leaves the queries no token: refused before the first step, naming the first such row
    recipe.write_text(recipe.read_text().replace("max_length: 32", "max_length: 12"))
    data.write_text(good)
    failed = run(tmp_path)
    assert failed.returncode == 2
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llm2emb train: error: stages[0].datasets[0]: {data}:1: query the prompt around the text")
    assert "of max_length 12, leaving the text none" in line
    assert not (tmp_path / "run").exists()
    recipe.write_text(recipe.read_text().replace("max_length: 12", "max_length: 32"))
    assert run(tmp_path).returncode == 0
