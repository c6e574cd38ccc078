"""MNTP and SimCSE: masking and the i-1 shift by hand, the LM head, learning on a tiny corpus, the recipe path."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.mntp import MASK_TOKEN, MNTPCollator, MNTPTrainer, lm_head, mntp_loss
from llm2emb.train.objectives import build_objective_data
from llm2emb.train.recipe import StageSpec
from llm2emb.train.recipe_file import load_recipe
from llm2emb.train.runner import train
from llm2emb.train.simcse import AttentionDropout

TEXTS = [f"The {a} {b} on the {c}." for a in ("cat", "dog", "man", "chef") for b in ("sat", "slept") for c in ("mat", "street")]


def embedder(base, lora_dropout: float = 0.0) -> Embedder:
    torch.manual_seed(0)
    model = Embedder.from_pretrained(base, pooling="mean")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj", "up_proj"])
    model.backbone = get_peft_model(model.backbone, lora)
    return model


def test_mntp_predicts_token_i_from_position_i_minus_1(tiny_qwen2):
    model = embedder(tiny_qwen2).eval()
    head = lm_head(model)
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 77  # the token originally at position 3; it must be predicted from position 2
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        want = F.cross_entropy(hidden[0, 2:3] @ model.backbone.get_input_embeddings().weight.T, torch.tensor([77]))
        assert mntp_loss(model, head, batch).item() == pytest.approx(want.item(), rel=1e-5)
        labels[0, 3], labels[0, 0] = -100, 77  # position 0 has no predecessor: nothing to predict
        assert mntp_loss(model, head, batch).item() == 0.0


def test_mntp_collator_masks_only_text_tokens_and_labels_the_originals(tiny_qwen2):
    model = embedder(tiny_qwen2)
    collator = MNTPCollator(model, mask_probability=0.5)
    torch.manual_seed(0)
    items = [{"query": text} for text in TEXTS]
    batch = collator(items)
    original = model.tokenizer([t for t in TEXTS], padding=True, return_tensors="pt")["input_ids"]
    masked = batch["labels"] != -100
    assert 0.35 < masked.float().sum() / batch["attention_mask"].sum() < 0.65
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert not masked[batch["attention_mask"] == 0].any()
    mask_id = model.tokenizer.convert_tokens_to_ids(collator.tokenizer.mask_token)
    assert collator.tokenizer.mask_token == model.tokenizer.convert_ids_to_tokens(
        model.tokenizer(MASK_TOKEN, add_special_tokens=False)["input_ids"][0])
    share = (batch["input_ids"][masked] == mask_id).float().mean()
    assert 0.6 < share < 0.95  # BERT's 80% mask / 10% random / 10% kept
    assert model.tokenizer.mask_token is None  # the model's own tokenizer is untouched


def test_lm_head_tied_and_loaded_from_an_untied_base(tiny_qwen2, tmp_path):
    model = embedder(tiny_qwen2)
    assert lm_head(model).weight is model.backbone.get_input_embeddings().weight
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "causal")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "causal" / name).write_bytes((Path(tiny_qwen2) / name).read_bytes())
    untied = Embedder.from_pretrained(tmp_path / "causal", pooling="mean")
    saved = load_file(str(tmp_path / "causal" / "model.safetensors"))["lm_head.weight"]
    head = lm_head(untied)
    assert torch.equal(head.weight, saved) and not head.weight.requires_grad
    assert not torch.equal(saved, untied.backbone.get_input_embeddings().weight)


def test_mntp_training_lowers_the_loss_on_a_tiny_corpus(tiny_qwen2, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    stage = StageSpec.model_validate({"name": "mntp", "objective": "mntp", "max_steps": 30, "batch_size": 8,
                                      "datasets": [{"path": str(corpus)}]}, context={"base_dir": tmp_path})
    data = build_objective_data(stage, 0, "fail", seed=0)
    model = embedder(tiny_qwen2)
    collator = MNTPCollator(model, stage.mask_probability)
    torch.manual_seed(5)
    fixed = collator([{"query": t} for t in TEXTS])
    head = lm_head(model)
    with torch.no_grad():
        before = mntp_loss(model.eval(), head, fixed).item()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, learning_rate=1e-2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             lr_scheduler_type="constant", include_num_input_tokens_seen="non_padding")
    trainer = MNTPTrainer(model, args, head=head, train_dataset=data, data_collator=collator)
    trainer.train()
    with torch.no_grad():
        after = mntp_loss(model.eval(), head, fixed).item()
    assert after < before - 0.2, (before, after)  # measured: 5.95 -> 5.59 in 30 steps
    assert trainer.state.num_input_tokens_seen > 0


def test_attention_dropout_makes_two_views_and_is_restored(tiny_qwen2):
    model = embedder(tiny_qwen2).train()
    batch = model.tokenize(TEXTS[:4])
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))  # no dropout anywhere: identical views
        callback = AttentionDropout(model, 0.3)
        callback.on_train_begin(None, None, None)
        assert not torch.allclose(model(batch), model(batch))
        callback.on_train_end(None, None, None)
        assert torch.equal(model(batch), model(batch))


RECIPE = """\
    model: {base: BASE, max_length: 32}
    lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
    output_dir: OUT
    report_to: []
    stages:
      - {name: mntp, objective: mntp, max_steps: 2, batch_size: 4, learning_rate: 1.0e-3, datasets: [{path: corpus.txt}]}
      - {name: simcse, objective: simcse, max_steps: 2, gradcache_chunk: 2, simcse_dropout: 0.2,
         datasets: [{path: sentences.jsonl, columns: {text: sentence}}]}
      - {name: pairs, max_steps: 2, datasets: [{path: pairs.jsonl}]}
"""


def test_recipe_runs_mntp_then_simcse_then_contrastive(tiny_qwen2, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "sentences.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": t, "positive": t.upper()}) + "\n" for t in TEXTS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("BASE", str(tiny_qwen2)).replace("OUT", str(tmp_path / "run")))
    summary = train(recipe)
    assert [s["name"] for s in summary.stages] == ["mntp", "simcse", "pairs"]
    assert all(s["steps"] == 2 for s in summary.stages)
    mntp, simcse, pairs = (s["final_loss"] for s in summary.stages)
    # MNTP is a next-token cross-entropy over the 400-token vocabulary: near ln(400) = 5.99 for a random model
    # (0 or NaN if the labels leaked or were all ignored). SimCSE and pairs are InfoNCE over 4 candidates.
    assert abs(mntp - math.log(400)) < 2.0, mntp
    assert 0 < simcse < math.log(4) + 1 and 0 < pairs < math.log(4) + 1, (simcse, pairs)
    adapter = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in adapter.items())  # B starts at zero
    loaded = Embedder.from_pretrained(tmp_path / "run" / "model")
    assert loaded.encode(["a cat"]).shape == (1, 64)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"datasets": [{"path": "corpus.txt"}]}, r"stages\[0\]\.datasets\[0\]\.path: corpus.txt: a .txt file holds raw text"),
        ({"objective": "simcse", "hard_negatives": 2, "datasets": [{"path": "corpus.txt"}]},
         r"stages\[0\]\.hard_negatives: objective simcse trains on raw text"),
        ({"objective": "simcse", "datasets": [{"path": "corpus.txt", "in_batch_negatives": False}]},
         r"in_batch_negatives: objective simcse needs in-batch negatives"),
        ({"objective": "mntp", "mask_probability": 1.0, "datasets": [{"path": "corpus.txt"}]},
         r"stages\[0\]\.mask_probability: Input should be less than 1"),
    ],
)
def test_recipe_rejects_bad_objective_stages(tmp_path, stage, message):
    (tmp_path / "corpus.txt").write_text("a\nb\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"base": "org/model"}, "output_dir": "out",
                                  "stages": [{"max_steps": 2, **stage}]}))
    with pytest.raises(UserError, match=message):
        load_recipe(recipe)


def test_text_column_errors_name_the_row(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    stage = StageSpec.model_validate({"name": "s", "objective": "simcse", "max_steps": 1, "batch_size": 1,
                                      "datasets": [{"path": str(tmp_path / "rows.jsonl")}]}, context={"base_dir": tmp_path})
    with pytest.raises(UserError, match=r"rows.jsonl:2: field 'text' must be a non-empty string"):
        build_objective_data(stage, 0, "fail", seed=0)
    assert len(build_objective_data(stage, 0, "skip", seed=0)) == 1
