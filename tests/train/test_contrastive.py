"""A stage's loss options reach the trainer: Matryoshka plans, the guide model, late interaction, and GradCache with
each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.contrastive import matryoshka_plan, trainer_options
from llm2emb.train.data import ContrastiveCollator, StageData, load_rows
from llm2emb.train.losses import candidate_mask, guide_mask
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.trainer import ContrastiveTrainer

SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"query": f"{s} on the street?", "positive": f"A {s} is on the street.", "negative": f"No {s} here."}
            for s in SUBJECTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage(data_file: Path, **keys) -> StageSpec:
    return StageSpec.model_validate(
        {"name": "s", "max_steps": 2, "datasets": [{"path": str(data_file)}], **keys},
        context={"base_dir": data_file.parent},
    )


def embedder(base: Path) -> Embedder:
    torch.manual_seed(0)
    model = Embedder.from_pretrained(base, pooling="mean")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.backbone = get_peft_model(model.backbone, lora)
    return model


def test_matryoshka_plans(tiny_qwen2, data_file):
    model = embedder(tiny_qwen2)  # dim 64, 2 layers
    assert matryoshka_plan(stage(data_file), model, 0) == (None, [])
    assert matryoshka_plan(stage(data_file, matryoshka_dims=[16, 64]), model, 0) == ([(0, 16), (0, 64)], [])
    plan = matryoshka_plan(stage(data_file, matryoshka_layers=[[1, 16], [2, 64]]), model, 0)
    assert plan == ([(0, 16), (1, 64)], [1, None])
    plan = matryoshka_plan(stage(data_file, matryoshka_dims=[32], matryoshka_layers=[[1, 16]]), model, 0)
    assert plan == ([(0, 32), (1, 16)], [None, 1])
    with pytest.raises(UserError, match=r"stages\[3\]\.matryoshka_dims: dim 128 exceeds .* 64"):
        matryoshka_plan(stage(data_file, matryoshka_dims=[128]), model, 3)
    with pytest.raises(UserError, match=r"matryoshka_layers: 3 layers, the model has 2"):
        matryoshka_plan(stage(data_file, matryoshka_layers=[[3, 16]]), model, 0)


def test_trainer_options_carry_the_recipe_keys(tiny_qwen2, data_file):
    model = embedder(tiny_qwen2)
    spec = stage(data_file, hardness_weight=2.0, false_negative_margin=0.9, matryoshka_dims=[8, 64],
                 guide_model=str(tiny_qwen2))
    options = trainer_options(spec, model, 0)
    loss = options["loss"]
    assert (loss.hardness_weight, loss.false_negative_margin, loss.views) == (2.0, 0.9, [(0, 8), (0, 64)])
    assert options["layers"] is None and model.config.matryoshka_dims == [8, 64]
    assert not any(p.requires_grad for p in options["guide"].parameters())


def make_trainer(model, data_file, out, chunk, **options) -> ContrastiveTrainer:
    spec = DatasetSpec.model_validate({"path": str(data_file)}, context={"base_dir": data_file.parent})
    args = TrainingArguments(output_dir=str(out), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    return ContrastiveTrainer(model=model, args=args, gradcache_chunk=chunk,
                              train_dataset=StageData([load_rows(spec)], batch_size=6, hard_negatives=1, seed=3),
                              data_collator=ContrastiveCollator(model), **options)


def assert_same(got: dict, want: dict) -> None:
    assert want and got.keys() == want.keys()
    for name, value in want.items():
        assert value.abs().sum() > 0, name
        assert ((got[name] - value).norm() / value.norm()).item() < 1e-5, name


def test_guide_masks_in_training_and_gradcache_keeps_full_batch_gradients(
    step_gradients, tiny_qwen2, data_file, tmp_path
):
    spec = stage(data_file, guide_model=str(tiny_qwen2))
    grads = {}
    for chunk in (None, 2):
        model = embedder(tiny_qwen2)
        trainer = make_trainer(model, data_file, tmp_path / str(chunk), chunk, **trainer_options(spec, model, 0))
        grads[chunk] = step_gradients(trainer)
    assert_same(grads[2], grads[None])
    # The guide (the untrained base) really removes negatives from this batch, so the test is not vacuous.
    batch = next(iter(trainer.get_train_dataloader()))
    guide = trainer.guide_embeddings(batch)
    scores = torch.nn.functional.normalize(guide["guide_queries"], dim=-1) @ torch.nn.functional.normalize(
        guide["guide_documents"], dim=-1).T
    plain = candidate_mask(batch["query_ids"], batch["document_ids"], torch.tensor(True))
    assert (plain & ~guide_mask(scores)).any()


def test_two_dimensional_matryoshka_step_equals_full_batch(step_gradients, tiny_qwen2, data_file, tmp_path):
    spec = stage(data_file, matryoshka_layers=[[1, 16], [2, 64]])
    grads = {}
    for chunk in (None, 2):
        model = embedder(tiny_qwen2)
        options = trainer_options(spec, model, 0)
        assert options["layers"] == [1, None]
        trainer = make_trainer(model, data_file, tmp_path / str(chunk), chunk, **options)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            first, full = trainer.embed_fn(model, batch)(batch["queries"]).chunk(2, dim=-1)
            assert torch.allclose(full, model(batch["queries"])) and not torch.allclose(first, full, atol=1e-3)
        grads[chunk] = step_gradients(trainer)
    assert_same(grads[2], grads[None])


def test_late_interaction_trains_the_head_and_gradcache_keeps_full_batch_gradients(
    step_gradients, tiny_qwen2, data_file, tmp_path
):
    spec = stage(data_file, hard_negatives=1, late_interaction={"dim": 8, "weight": 0.5})
    grads = {}
    for chunk in (None, 2):
        model = embedder(tiny_qwen2)
        torch.manual_seed(2)
        model.add_token_head(8)
        options = trainer_options(spec, model, 0)
        term = options["loss"].late_interaction
        assert (term.pooled_dim, term.token_dim, term.weight) == (64, 8, 0.5)
        trainer = make_trainer(model, data_file, tmp_path / str(chunk), chunk, **options)
        grads[chunk] = step_gradients(trainer)
        assert "token_head.projection.weight" in grads[chunk]  # the head learns, next to the adapter
    assert_same(grads[2], grads[None])  # chunks of short texts are padded back to the batch's token width


def test_the_late_interaction_term_adds_chamfer_infonce_to_the_pooled_loss():
    from llm2emb.model.late_interaction import chamfer_scores
    from llm2emb.train.late_loss import LateInteractionTerm, pack
    from llm2emb.train.losses import InfoNCELoss

    torch.manual_seed(0)
    pooled = torch.randn(4, 6), torch.randn(8, 6)  # 4 queries; 4 positives then one hard negative each
    tokens = [torch.nn.functional.normalize(torch.randn(n, t, 3), dim=-1) for n, t in ((4, 5), (8, 7))]
    masks = [(torch.arange(t) < torch.randint(1, t + 1, (n, 1))).long() for n, t in ((4, 5), (8, 7))]
    packed = [pack(p, t, m, width=9) for p, t, m in zip(pooled, tokens, masks)]
    term = LateInteractionTerm(6, 3, weight=0.5)
    back = term.unpack(packed[1])
    assert torch.equal(back[0], pooled[1]) and torch.equal(back[1][:, :7], tokens[1]) and not back[1][:, 7:].any()
    ids = (torch.arange(4), torch.arange(8))
    late = InfoNCELoss(0.05, late_interaction=term)(*packed, *ids)
    plain = InfoNCELoss(0.05)(*pooled, *ids)
    logits = chamfer_scores(tokens[0], masks[0], tokens[1], masks[1]) / 0.05
    want = plain + 0.5 * torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert late.item() == pytest.approx(want.item(), rel=1e-5) and late.item() > plain.item()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"late_interaction": {"dim": 0}}, r"stages\[0\]\.late_interaction\.dim: Input should be greater than 0"),
        ({"late_interaction": {}, "objective": "mntp", "datasets": [{"path": "TEXT"}]},
         r"stages\[0\]\.late_interaction: objective mntp has no queries and documents"),
        ({"late_interaction": {}, "matryoshka_layers": [[1, 16]]},
         r"stages\[0\]\.late_interaction: cannot be combined with matryoshka_layers"),
        ({"late_interaction": {}, "loss": "cosent", "datasets": [{"path": "SCORED", "format": "scored_pairs"}]},
         r"stages\[0\]\.late_interaction: acts on InfoNCE's negatives; loss cosent has none"),
    ],
)
def test_recipe_rejects_late_interaction_where_it_cannot_train(data_file, keys, message):
    from llm2emb.train.recipe_file import validate_recipe

    for dataset in keys.get("datasets", []):
        name = {"TEXT": "texts.txt", "SCORED": "scored.tsv"}[dataset["path"]]
        (data_file.parent / name).write_text("score\tsentence1\tsentence2\n3\ta\tb\n" if name == "scored.tsv" else "a\n")
        dataset["path"] = str(data_file.parent / name)
    recipe = {"model": {"base": "org/model"}, "output_dir": "out",
              "stages": [{"max_steps": 2, "datasets": [{"path": str(data_file)}], **keys}]}
    with pytest.raises(UserError, match=message):
        validate_recipe(recipe)


def test_every_late_interaction_stage_trains_one_head_width(data_file):
    from llm2emb.train.recipe_file import validate_recipe

    first = {"name": "a", "max_steps": 2, "datasets": [{"path": str(data_file)}], "late_interaction": {"dim": 8}}
    second = {**first, "name": "b", "late_interaction": {"dim": 16}}
    recipe = {"model": {"base": "org/model"}, "output_dir": "out", "stages": [first, second]}
    with pytest.raises(UserError, match=r"stages\[1\]\.late_interaction\.dim: 16: every stage trains the one "
                                        r"token head, of 8 dimensions"):
        validate_recipe(recipe)
    second["late_interaction"] = None  # a later stage may leave the head alone
    assert validate_recipe(recipe).token_dim == 8


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"hardness_weight": -1}, r"stages\[0\]\.hardness_weight: Input should be greater than or equal to 0"),
        ({"false_negative_margin": 0}, r"stages\[0\]\.false_negative_margin: Input should be greater than 0"),
        ({"guide_model": "./missing"}, r"stages\[0\]\.guide_model: \./missing: not found"),
        ({"matryoshka_dims": [64, 64]}, r"stages\[0\]\.matryoshka_dims: 64 is listed twice"),
        ({"matryoshka_dims": []}, r"stages\[0\]\.matryoshka_dims: an empty list"),
        ({"matryoshka_layers": [[0, 16]]}, r"stages\[0\]\.matryoshka_layers\[0\]\[0\]: Input should be greater than 0"),
    ],
)
def test_recipe_rejects_bad_trick_keys(data_file, keys, message):
    from llm2emb.train.recipe_file import validate_recipe

    recipe = {"model": {"base": "org/model"}, "output_dir": "out",
              "stages": [{"max_steps": 2, "datasets": [{"path": str(data_file)}], **keys}]}
    with pytest.raises(UserError, match=message):
        validate_recipe(recipe)
