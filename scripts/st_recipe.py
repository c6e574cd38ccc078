"""An llm2emb recipe's stages trained with sentence-transformers' own losses: the long recipe's fair baseline.

Issue 29 asks for `recipes/smollm2-all-data.yaml`'s data run through sentence-transformers, as that library offers
it: MultipleNegativesRankingLoss for the contrastive stages and CoSENTLoss for the graded one, on the causal base
with mean pooling. Each stage here gets exactly the batches llm2emb trains on (`build_stage_data` for the recipe's
seed, items in `training_order`, fed to sentence-transformers with a sequential batch sampler): the same rows, the
same hard negatives (random ones for pairs, as llm2emb draws them), the same batch size, steps and lengths, and the
loss at the recipe's temperature (scale = 1 / temperature). The optimisation is the script's own: its defaults
(learning rate 5e-5, linear decay, no warmup) unless `--learning-rates` (one per stage) and `--set` (training
arguments for every stage, e.g. `warmup_ratio=0.1`) say otherwise, so its tuned settings are a command-line choice.

sentence-transformers renders each text through the base's chat template itself (its default for a tokenizer that has
one, all of it pooled), as in scripts/compare_recipes.py. A query's instruction is written into its text with the base
folder's query template (`Instruct: ...\nQuery: ...`
by default), and the saved model carries that prefix as its "query" prompt, so `llm2emb eval` (which calls
`encode_query`) prompts SciFact's queries as training did. Stages resume from their last checkpoint; a finished
stage's model is kept and the next stage starts from it.

    python -m scripts.st_recipe recipes/smollm2-all-data.yaml --base runs/q/smol-causal --out runs/st-all-data \
        --learning-rates 8e-4 2e-4 2e-4 --set warmup_ratio=0.1
    llm2emb eval runs/st-all-data/model --sts ../shared/data/stsb/test.tsv --beir ../shared/data/scifact \
        --max-length 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llm2emb.errors import UserError

CHECKPOINT_STEPS = 10

UNMAPPED_STAGE_KEYS = ("teacher", "matryoshka_dims", "matryoshka_layers", "late_interaction", "mine", "guide_model")
"""Stage keys with no counterpart here: a recipe that sets one is refused rather than trained without it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="llm2emb recipe YAML: its stages, data, seed, batch sizes, steps and lengths")
    p.add_argument("--base", required=True, help="HF folder of the base with causal attention (sentence-transformers)")
    p.add_argument("--out", required=True, help="folder for the stages and the final model (<out>/model)")
    p.add_argument("--learning-rates", type=float, nargs="+",
                   help="one per stage (default: sentence-transformers' 5e-5 for every stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a sentence-transformers training argument for every stage, e.g. warmup_ratio=0.1")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def stage_rows(stage, index: int, recipe) -> tuple[dict[str, list], str | None]:
    """The stage's training items in llm2emb's order, as sentence-transformers columns, and the query prefix used
    (None when no row has an instruction)."""
    from llm2emb.model.prompts import Prompts
    from llm2emb.train.data import build_stage_data, training_order

    problem = next((key for key in UNMAPPED_STAGE_KEYS if getattr(stage, key)), None)
    if problem or stage.objective != "contrastive" or stage.loss not in ("infonce", "cosent"):
        what = problem or (f"objective {stage.objective}" if stage.objective != "contrastive" else f"loss {stage.loss}")
        raise UserError(f"stages[{index}] ({stage.name}): {what} has no sentence-transformers counterpart here")
    data = build_stage_data(stage, index, recipe.on_bad_rows, recipe.seed)
    if not all(part.spec.in_batch_negatives for part in data.parts):
        raise UserError(f"stages[{index}] ({stage.name}): MultipleNegativesRankingLoss always uses in-batch negatives")
    items = [data[i] for i in training_order(data.batch_sampler, stage.max_steps * stage.batch_size)]
    prompts = Prompts(query_template(recipe))
    anchors = [prompts.query(item["query"], item["instruction"]).string for item in items]
    prefixes = {prompts.query("", item["instruction"]).string for item in items if item["instruction"]}
    columns: dict[str, list] = {"anchor": anchors, "positive": [item["positive"] for item in items]}
    if stage.loss == "cosent":
        columns["score"] = [float(item["score"]) for item in items]
    for k in range(stage.hard_negatives):
        columns[f"negative_{k + 1}"] = [item["negatives"][k] for item in items]
    return columns, (prefixes.pop() if len(prefixes) == 1 else None)


def query_template(recipe) -> str:
    """The base's query template, as llm2emb renders instructions (its model folder, or the library default)."""
    from llm2emb.model.config import DEFAULT_QUERY_TEMPLATE, EmbedderConfig, is_model_folder

    base = Path(recipe.model.base)
    return EmbedderConfig.load(base).query_template if is_model_folder(base) else DEFAULT_QUERY_TEMPLATE


def stage_loss(model, stage):
    """sentence-transformers' loss for the stage, at the recipe's temperature."""
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss

    loss = CoSENTLoss if stage.loss == "cosent" else MultipleNegativesRankingLoss
    return loss(model, scale=1.0 / stage.temperature)


def train_stage(args, recipe, index: int, start: str, folder: Path, learning_rate: float | None,
                overrides: dict) -> tuple[Path, str | None]:
    """One stage from the model at `start`; returns its saved model and the query prefix it trained with."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, models
    from sentence_transformers import SentenceTransformerTrainingArguments as TrainingArguments

    from scripts.compare_recipes import sequential_batches

    stage = recipe.stages[index]
    columns, prefix = stage_rows(stage, index, recipe)
    model_dir = folder / "model"
    if (model_dir / "modules.json").is_file():
        return model_dir, prefix
    max_length = stage.max_length or recipe.model.max_length
    torch.manual_seed(recipe.seed)
    if index == 0:
        transformer = models.Transformer(start, max_seq_length=max_length)
        pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
        model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    else:
        model = SentenceTransformer(start, device="cpu")
        model.max_seq_length = max_length
    settings = {**({"learning_rate": learning_rate} if learning_rate is not None else {}), **overrides}
    training = TrainingArguments(
        output_dir=str(folder / "trainer"), max_steps=stage.max_steps, per_device_train_batch_size=stage.batch_size,
        seed=recipe.seed, batch_sampler=sequential_batches, save_strategy="steps", save_steps=CHECKPOINT_STEPS,
        save_total_limit=1, logging_steps=recipe.logging_steps, report_to=[], use_cpu=True,
        dataloader_drop_last=True, **settings,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=Dataset.from_dict(columns),
                                         loss=stage_loss(model, stage))
    checkpoints = list((folder / "trainer").glob("checkpoint-*"))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=bool(checkpoints) or None)
    if prefix:
        model.prompts = {**model.prompts, "query": prefix}
    model.save(str(model_dir))
    record = {"stage": stage.name, "steps": stage.max_steps, "batch_size": stage.batch_size, "loss": stage.loss,
              "max_length": max_length, "settings": settings, "query_prompt": prefix,
              "train_seconds": None if checkpoints else round(time.perf_counter() - started, 1),
              "log": [entry for entry in trainer.state.log_history if "loss" in entry]}
    (folder / "stage.json").write_text(json.dumps(record, indent=2) + "\n")
    return model_dir, prefix


def main(argv=None) -> None:
    import torch

    from llm2emb.train.recipe_file import load_recipe
    from scripts.compare_recipes import st_overrides

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe)
        rates = args.learning_rates or [None] * len(recipe.stages)
        if len(rates) != len(recipe.stages):
            raise UserError(f"--learning-rates: {len(rates)} given for {len(recipe.stages)} stages")
        overrides = st_overrides("st:" + ",".join(args.overrides))
        out = Path(args.out)
        start, prefix = args.base, None
        for index, stage in enumerate(recipe.stages):
            folder = out / "stages" / f"{index}-{stage.name}"
            model_dir, stage_prefix = train_stage(args, recipe, index, start, folder, rates[index], overrides)
            start, prefix = str(model_dir), stage_prefix or prefix
    except UserError as exc:
        sys.exit(f"error: {exc}")
    final = out / "model"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(start, device="cpu")
    if prefix:
        model.prompts = {**model.prompts, "query": prefix}
    model.save(str(final))
    print(f"wrote {final}" + (f" (query prompt {prefix!r})" if prefix else ""))


if __name__ == "__main__":
    main()
