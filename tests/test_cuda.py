"""GPU-only paths: the CUDA varlen kernels and QLoRA. Skipped without a GPU (CI has none); run on the device machine.

    python -m pytest -q tests/test_cuda.py
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from llm2emb import Embedder
from llm2emb.commands.convert import convert
from llm2emb.model.backbone import VERIFIED_MODEL_TYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = [
    "A man is playing a guitar on the street.",
    "The cat sat.",
    "Proteins fold into three-dimensional structures; enzymes catalyse reactions in the cell.",
    "Given a question, retrieve passages that answer it.",
]
CUDA_KERNELS = [k for k in ("flash_attn", "varlen_attn")
                if importlib.util.find_spec("flash_attn" if k == "flash_attn" else "torch.nn.attention.varlen")]
BF16_TOLERANCE = 2e-2
"""Two bf16 kernels (varlen vs padded sdpa) round differently; unit vectors agree to about 1e-2."""


def load(path, backend, pooling="mean"):
    return Embedder.from_pretrained(path, pooling=pooling, torch_dtype=torch.bfloat16, device="cuda",
                                    attention_backend=backend)


def test_auto_picks_a_cuda_varlen_kernel(tiny_qwen2):
    embedder = load(tiny_qwen2, "auto")
    expected = "flash_attn" if "flash_attn" in CUDA_KERNELS else "varlen_attn"
    assert embedder.attention_kernel == expected


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
@pytest.mark.parametrize("pooling", ["mean", "last_token"])
@torch.no_grad()
def test_cuda_kernel_packed_equals_each_text_alone(tiny_models, arch, kernel, pooling):
    embedder = load(tiny_models[arch], kernel, pooling)
    assert embedder.attention_kernel == kernel
    together = embedder(embedder.tokenize(TEXTS, "Find a paraphrase")).float()
    embedder.set_attention_backend("padded")
    for i, text in enumerate(TEXTS):
        alone = embedder(embedder.tokenize([text], "Find a paraphrase")).float()
        assert (alone[0] - together[i]).abs().max().item() <= BF16_TOLERANCE, (arch, i)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@torch.no_grad()
def test_cuda_kernel_has_no_attention_across_texts(tiny_qwen2, kernel):
    embedder = load(tiny_qwen2, kernel, "last_token")
    batch = embedder.tokenize(TEXTS)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, 0] = (changed["input_ids"][1, 0] + 7) % embedder.backbone.config.vocab_size
    before, after = embedder(batch).float(), embedder(changed).float()
    assert (before[1] - after[1]).abs().max().item() > 1e-3
    assert (before[[0, 2, 3]] - after[[0, 2, 3]]).abs().max().item() <= 1e-3


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_trains_a_4bit_base_and_saves_a_loadable_model(tiny_qwen2, tmp_path):
    import bitsandbytes as bnb

    from llm2emb.train.recipe_file import load_recipe
    from llm2emb.train.runner import train
    from llm2emb.train.setup import load_embedder

    base = tmp_path / "emb"
    convert(str(tiny_qwen2), base, pooling="mean", dtype="float32")
    rows = [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far away."}
            for s in ("man", "cat", "dog", "chef") for p in ("street", "mat", "garden", "kitchen")]
    (tmp_path / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"base": str(base), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "quantization": "4bit", "bf16": True, "output_dir": str(tmp_path / "run"), "report_to": ["none"],
        "stages": [{"name": "s", "max_steps": 3, "batch_size": 8, "gradcache_chunk": 4, "learning_rate": 1e-3,
                    "hard_negatives": 1, "datasets": [{"path": str(tmp_path / "triplets.jsonl")}]}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    quantized = load_embedder(load_recipe(path))
    four_bit = [m for m in quantized.backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the base's linear layers should be bitsandbytes 4-bit"
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    del quantized

    summary = train(path)
    assert all(torch.isfinite(torch.tensor(s["final_loss"])) for s in summary.stages)
    trained = Embedder.from_pretrained(summary.model_dir, device="cuda")
    vectors = trained.encode(TEXTS)
    assert vectors.shape[0] == len(TEXTS) and bool((abs((vectors**2).sum(1) - 1) < 1e-3).all())


@pytest.mark.parametrize("lora", [True, False])
def test_fsdp_shards_with_torchrun_and_trains_with_gradcache(tiny_qwen2, tmp_path, lora):
    """`sharding: fsdp` under torchrun (every visible GPU, one process each): accelerate wraps the model in FSDP,
    GradCache chunks replay through it, each stage's model is saved from the gathered full state dict, and the
    saved model loads."""
    import os
    import subprocess
    import sys

    base = tmp_path / "emb"
    convert(str(tiny_qwen2), base, pooling="mean", dtype="float32")
    rows = [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far away."}
            for s in ("man", "cat", "dog", "chef") for p in ("street", "mat", "garden", "kitchen")]
    (tmp_path / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    processes = torch.cuda.device_count()
    recipe = {
        "model": {"base": str(base), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"} if lora else None,
        "sharding": "fsdp", "output_dir": str(tmp_path / "run"), "report_to": ["none"],
        # two stages: the second starts from an unsharded copy of the first's saved weights and is sharded again
        "stages": [{"name": name, "max_steps": 3, "batch_size": 4 * processes, "gradcache_chunk": 2 * processes,
                    "learning_rate": 1e-3, "hard_negatives": 1, "datasets": [{"path": str(tmp_path / "triplets.jsonl")}]}
                   for name in ("a", "b")],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "llm2emb.cli",
               "train", str(tmp_path / "recipe.yaml")]
    limit_s = 120  # 6 tiny steps take seconds; a hung rendezvous must fail here with its output, not outlast the device
    try:
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                timeout=limit_s)
    except subprocess.TimeoutExpired as hung:
        stderr = (hung.stderr or b"").decode(errors="replace")  # TimeoutExpired holds bytes even with text=True
        pytest.fail(f"torchrun still running after {limit_s} s; its stderr ended: {stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [stage["sharding"] for stage in summary["stages"]] == ["fsdp", "fsdp"]
    assert all(torch.isfinite(torch.tensor(stage["final_loss"])) for stage in summary["stages"])
    Embedder.from_pretrained(tmp_path / "run" / "model").encode(TEXTS)
