"""ContrastiveTrainer on a tiny Embedder with LoRA and a trainable pooler: learning, GradCache, NaN stop, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.data import ContrastiveCollator, StageData, load_rows
from llm2emb.train.embedder_trainer import EXTRA_STATE_NAME, STAGING_NAME
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.losses import InfoNCELoss
from llm2emb.train.recipe import DatasetSpec
from llm2emb.train.trainer import ContrastiveTrainer

SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital"]
PLACES = ["street", "kitchen", "mat", "garden"]
BATCH, K = 4, 1


def write_data(path: Path) -> Path:
    rows = [
        {
            "query": f"{s} on the {p}?",
            "positive": f"A {s} is on the {p}.",
            "negative": f"A {s} is far from the {p}.",
        }
        for s in SUBJECTS
        for p in PLACES[:2]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def make_embedder(base: Path, seed: int = 0) -> Embedder:
    torch.manual_seed(seed)
    embedder = Embedder.from_pretrained(base, pooling={"type": "latent_attention", "num_latents": 4, "num_heads": 2})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    embedder.backbone = get_peft_model(embedder.backbone, lora)
    return embedder


def make_trainer(embedder, data_file, out: Path, chunk=2, learnable=True, options=None, **args) -> ContrastiveTrainer:
    """`options`: ContrastiveTrainer keywords; `args`: TrainingArguments over these defaults."""
    spec = DatasetSpec.model_validate({"path": str(data_file)}, context={"base_dir": data_file.parent})
    dataset = StageData([load_rows(spec)], batch_size=BATCH, hard_negatives=K, seed=7)
    defaults = dict(
        output_dir=str(out),
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    return ContrastiveTrainer(
        model=embedder,
        args=TrainingArguments(**{**defaults, **args}),
        loss=InfoNCELoss(temperature=0.1, learnable_temperature=learnable),
        gradcache_chunk=chunk,
        train_dataset=dataset,
        data_collator=ContrastiveCollator(embedder),
        **(options or {}),
    )


def trainable_state(trainer: ContrastiveTrainer) -> dict[str, torch.Tensor]:
    named = list(trainer.model.named_parameters()) + list(trainer.contrastive_loss.named_parameters(prefix="loss"))
    return {n: p.detach().clone() for n, p in named if p.requires_grad}


def fixed_batch(trainer: ContrastiveTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_training_reduces_loss_and_trains_every_part(tiny_qwen2, data_file, tmp_path):
    trainer = make_trainer(make_embedder(tiny_qwen2), data_file, tmp_path / "run", max_steps=8)
    batch = fixed_batch(trainer)
    before_state = trainable_state(trainer)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model.eval(), batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model.eval(), batch).item()
    assert after < before - 0.1, (before, after)
    after_state = trainable_state(trainer)
    for part in ("lora_A", "lora_B", "pooler", "loss.temperature"):
        assert any(part in n and not torch.equal(before_state[n], v) for n, v in after_state.items()), part
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "temperature" in logs[0]
    assert trainer.state.num_input_tokens_seen > 0


def test_gradcache_step_equals_plain_step(tiny_qwen2, data_file, tmp_path):
    grads = {}
    for chunk in (None, 3):
        trainer = make_trainer(make_embedder(tiny_qwen2), data_file, tmp_path / str(chunk), chunk=chunk)
        trainer.create_optimizer()
        batch = fixed_batch(trainer)
        trainer.model.backbone.eval()  # dropout off: one full forward is the reference
        trainer.model.train = lambda mode=True, model=trainer.model: model  # keep it off inside training_step
        trainer.training_step(trainer.model, batch)
        grads[chunk] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        grads[chunk]["tau"] = trainer.contrastive_loss.temperature.log_temperature.grad.clone()
    nonzero = [name for name, want in grads[None].items() if want.abs().sum() > 0]
    for part in ("lora_A", "lora_B", "pooler", "tau"):
        assert any(part in name for name in nonzero), part
    for name, want in grads[None].items():
        error = (grads[3][name] - want).norm() / want.norm().clamp_min(1e-30)
        # float32: tau's gradient is one sum over the whole batch, and the chunks add it up in another order
        assert error < 3e-5, (name, error.item())


class CorruptTemperatureAfter(TrainerCallback):
    """Makes the loss NaN from the step after `step` on (a real non-finite state, not a mocked loss)."""

    def __init__(self, trainer, step: int):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.trainer.contrastive_loss.temperature.log_temperature.fill_(float("nan"))


def test_nan_loss_stops_before_optimizer_step(tiny_qwen2, data_file, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(make_embedder(tiny_qwen2), data_file, out, save_strategy="steps", save_steps=1)
    trainer.add_callback(CorruptTemperatureAfter(trainer, step=1))
    with pytest.raises(NonFiniteLossError, match="checkpoint-1 is intact"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    saved = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    live = {n: p for n, p in trainer.model.backbone.named_parameters() if "lora_" in n}
    assert len(saved) == len(live) > 0
    for name, value in saved.items():
        match = [p for n, p in live.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].detach(), value), name
    assert all(p.grad is None or not p.grad.isnan().any() for p in trainer.model.parameters())


def test_checkpoints_are_complete_model_folders_and_resume_exactly(tiny_qwen2, data_file, tmp_path):
    full = make_trainer(make_embedder(tiny_qwen2), data_file, tmp_path / "a", save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"llm2emb.json", "adapter_model.safetensors", "pooling.safetensors", EXTRA_STATE_NAME} <= files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= files
    assert not (tmp_path / "a" / STAGING_NAME).exists()
    reloaded = Embedder.from_pretrained(checkpoint)
    assert reloaded.pooler.trainable

    resumed = make_trainer(make_embedder(tiny_qwen2, seed=5), data_file, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want, got = trainable_state(full), trainable_state(resumed)
    assert want.keys() == got.keys()
    # Rounding differs by ~1e-6..1e-5 after reloading, and Adam's m/sqrt(v) turns it into steps of up to lr on the
    # near-zero gradient of the temperature (~4e-4), so that one weight is held to lr (5e-3); a wrong data position,
    # RNG state or a missed weight moves many others by ~lr, and those are held to 1e-4.
    for name in want:
        atol = 5e-3 if name.endswith("log_temperature") else 1e-4
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=atol, msg=name)


def test_layer_lr_decay_gives_each_depth_its_rate_and_the_schedule_keeps_the_ratios(tiny_qwen2, tmp_path):
    from llm2emb.train.layer_rates import depth

    embedder = Embedder.from_pretrained(tiny_qwen2, pooling={"type": "latent_attention", "num_latents": 4,
                                                              "num_heads": 2})
    layers = embedder.num_layers
    trainer = make_trainer(embedder, write_data(tmp_path / "rows.jsonl"), tmp_path / "run", learnable=False,
                           options={"layer_lr_decay": 0.5}, lr_scheduler_type="linear", max_steps=4)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    names = {id(p): n for n, p in embedder.named_parameters()}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            rates[names[id(parameter)]] = group["lr"]
    assert len(rates) == sum(p.requires_grad for p in embedder.parameters())  # every trained weight, once
    assert rates["backbone.embed_tokens.weight"] == pytest.approx(5e-3 * 0.5 ** (layers + 1))
    assert rates["backbone.layers.0.self_attn.q_proj.weight"] == pytest.approx(5e-3 * 0.5 ** layers)
    assert rates[f"backbone.layers.{layers - 1}.mlp.up_proj.weight"] == pytest.approx(5e-3 * 0.5)
    assert rates["backbone.norm.weight"] == rates["pooler.latents"] == pytest.approx(5e-3)
    assert depth("backbone.base_model.model.layers.3.self_attn.q_proj.lora_A.default.weight", 8) == 4  # under PEFT
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    by_group = [group["lr"] / group["initial_lr"] for group in trainer.optimizer.param_groups]
    assert max(by_group) == pytest.approx(min(by_group))  # one schedule: every depth decays alike
    with pytest.raises(UserError, match=r"layer_lr_decay must be in \(0, 1\]"):
        make_trainer(embedder, tmp_path / "rows.jsonl", tmp_path / "bad", options={"layer_lr_decay": 1.5})
