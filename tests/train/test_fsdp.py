"""FSDP full sharding on two CPU processes (gloo): a LoRA or fully fine-tuned Embedder, sharded the way accelerate
shards it under `sharding: fsdp` (FSDP2 `fully_shard` on every decoder layer, then on the whole model), trained one
GradCache step with embeddings gathered across processes, ends with the loss and weights of one process that saw
the whole batch; saved from the gathered full state dict (as Trainer saves under FSDP), it loads as that model, and
so do its weights put into a fresh unsharded copy (how the run continues after a sharded stage).

accelerate enables FSDP only for accelerator processes (its state never leaves MULTI_CPU for FSDP), so this test
applies `fully_shard` itself, with the units `training_arguments` hands to accelerate; `tests/test_cuda.py` runs the
same recipe key end to end through torchrun and Trainer on GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llm2emb.commands.convert import convert
from llm2emb.model.embedder import Embedder
from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.losses import InfoNCELoss

QUERIES = ["a man plays guitar", "the cat sat on the mat", "what is the capital of France?", "enzymes", "dog",
           "an onion in the kitchen"]
DOCUMENTS = ["A man is playing a guitar on the street.", "The cat sat on the mat and looked at the dog.",
             "Paris is the capital.", "Proteins fold; enzymes catalyse reactions.", "The dog looked at the cat.",
             "A woman is slicing an onion in the kitchen."]
CHUNK = 2  # GradCache chunks: three replayed forwards per side on each rank
LEARNING_RATE = 1e-2


def build(folder: str, lora: bool) -> Embedder:
    embedder = Embedder.from_pretrained(folder)
    if lora:
        torch.manual_seed(0)  # the same adapter on every process; B != 0 so both LoRA matrices get a gradient
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        embedder.backbone = get_peft_model(embedder.backbone, config)
    return embedder


def shard(embedder: Embedder) -> None:
    """What accelerate's FSDP2 preparation does with `transformer_layer_cls_to_wrap: [decoder layer]`."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in list(embedder.modules()):
        if type(module).__name__ == embedder.decoder_layer_class:
            fully_shard(module, mesh=mesh)
    fully_shard(embedder, mesh=mesh)


def train_step(embedder: Embedder, rows: list[int], no_sync) -> tuple[float, dict[str, torch.Tensor]]:
    """One GradCache step over `rows` (ids are global, so gathered positives line up) and one SGD update."""
    queries = embedder.tokenize([QUERIES[i] for i in rows], kind="query")
    documents = embedder.tokenize([DOCUMENTS[i] for i in rows], kind="document")
    ids = torch.tensor(rows)
    loss_module = InfoNCELoss(temperature=0.05)
    loss = gradcache_backward(embedder, [queries, documents], lambda embs: loss_module(embs[0], embs[1], ids, ids, True),
                              CHUNK, no_sync=no_sync)
    trained = [(name, p) for name, p in embedder.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trained], lr=LEARNING_RATE)
    optimizer.step()
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in trained}
    return loss.item(), weights


def worker(rank: int, init_file: str, folder: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for lora in (True, False):
            embedder = build(folder, lora)
            shard(embedder)

            @contextlib.contextmanager
            def no_sync(model=embedder):  # accelerate's no_sync for FSDP2: reduce-scatter only on the last backward
                model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    model.set_requires_gradient_sync(True)

            half = len(QUERIES) // 2
            results[lora] = train_step(embedder, list(range(rank * half, (rank + 1) * half)), no_sync)
            # accelerate's get_state_dict under FSDP2: every process takes part, the main one holds the weights
            full = get_model_state_dict(embedder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                embedder.save_pretrained(Path(out_dir) / f"model-lora{lora}", state_dict=full)
            del embedder
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_on_two_processes_matches_one_process(tiny_qwen2, tmp_path, two_workers):
    folder = tmp_path / "emb"
    convert(str(tiny_qwen2), folder, pooling="mean", dtype="float32")
    two_workers(worker, (str(tmp_path / "init"), str(folder), str(tmp_path)))

    for lora in (True, False):
        embedder = build(str(folder), lora)
        before = {name: p.detach().clone() for name, p in embedder.named_parameters() if p.requires_grad}
        want_loss, want = train_step(embedder, list(range(len(QUERIES))), contextlib.nullcontext)
        assert all(name.count("lora_") for name in want) == lora  # LoRA trains only adapters; full: everything
        moved = [name for name in want if not torch.equal(want[name], before[name])]
        assert len(moved) > len(want) // 2, "the step must move most trained weights for the comparison to mean anything"
        saved = Embedder.from_pretrained(tmp_path / f"model-lora{lora}")
        assert (tmp_path / f"model-lora{lora}" / "adapter_model.safetensors").is_file() == lora
        continued = build(str(folder), lora)  # how the runner continues after a sharded stage
        continued.load_weights(tmp_path / f"model-lora{lora}")
        for loaded in (saved, continued):
            np.testing.assert_allclose(loaded.encode(QUERIES + DOCUMENTS), embedder.encode(QUERIES + DOCUMENTS),
                                       atol=1e-5)
        for rank in range(2):
            loss, got = torch.load(tmp_path / f"rank{rank}.pt")[lora]
            assert loss == pytest.approx(want_loss, rel=1e-5), (rank, lora)
            assert got.keys() == want.keys()
            for name in want:
                update, want_update = got[name] - before[name], want[name] - before[name]
                # float32 sums in another order (gloo's reduce-scatter) and the rounding of the updated weight (a few
                # ulps of its scale); a missing gathered negative or an unsynchronised gradient changes the update
                # by far more
                rounding = 4 * torch.finfo(torch.float32).eps * before[name].abs().max().item()
                torch.testing.assert_close(update, want_update, rtol=1e-4,
                                           atol=1e-5 * want_update.abs().max().item() + rounding,
                                           msg=lambda m, where=(rank, lora, name): f"{where}: {m}")
