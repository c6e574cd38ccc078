"""A stage's contrastive loss and its helpers, built from the recipe: what `ContrastiveTrainer` gets besides data.

`trainer_options(stage, embedder, index)` returns the keyword arguments `loss`, `guide`, `teacher` and `layers`
of `ContrastiveTrainer`: InfoNCE with the stage's hardness weighting, false-negative margin, Matryoshka views,
distillation and late-interaction terms, the frozen guide model (GISTEmbed), the teacher and the layer counts of 2D Matryoshka. Checks that need the loaded model
(dims and layer counts within its size, the guide's tokenizer) fail here with the recipe key's path.
"""

from __future__ import annotations

from llm2emb.errors import UserError
from llm2emb.train.distillation import Distillation
from llm2emb.train.graded import GradedPairLoss
from llm2emb.train.late_loss import LateInteractionTerm
from llm2emb.train.losses import InfoNCELoss, Temperature
from llm2emb.train.recipe import StageSpec
from llm2emb.train.recipe_file import format_key_path
from llm2emb.train.teacher import Teacher, load_teacher


def matryoshka_plan(
    stage: StageSpec, embedder, index: int
) -> tuple[list[tuple[int, int]] | None, list[int | None]]:
    """(views, layer counts) of a stage: the loss's (segment, dim) pairs and the counts each segment runs.

    A count of None is the full model. Without `matryoshka_layers` there is one segment (the full model) and
    no layer counts to pass to the trainer ([]).
    """
    key = format_key_path(("stages", index))
    dims = list(stage.matryoshka_dims or [])
    pairs = [tuple(pair) for pair in stage.matryoshka_layers or []]
    too_wide = [d for d in dims + [d for _, d in pairs] if d > embedder.dim]
    if too_wide:
        name = "matryoshka_dims" if too_wide[0] in dims else "matryoshka_layers"
        raise UserError(f"{key}.{name}: dim {too_wide[0]} exceeds the model's embedding dim {embedder.dim}")
    total = embedder.num_layers
    too_deep = [count for count, _ in pairs if count > total]
    if too_deep:
        raise UserError(f"{key}.matryoshka_layers: {too_deep[0]} layers, the model has {total}")
    if not pairs:
        return ([(0, d) for d in dims] or None), []
    counts: list[int | None] = []
    for count in [total] * bool(dims) + [count for count, _ in pairs]:
        value = None if count == total else count
        if value not in counts:
            counts.append(value)
    views = [(counts.index(None), d) for d in dims]
    views += [(counts.index(None if count == total else count), d) for count, d in pairs]
    return views, counts


def load_guide(stage: StageSpec, embedder, index: int):
    """The frozen guide Embedder of `guide_model`; it must tokenize exactly as the trained model does."""
    from llm2emb.model.embedder import Embedder

    dtype = next(embedder.backbone.parameters()).dtype
    guide = Embedder.from_pretrained(stage.guide_model, torch_dtype=dtype)
    if guide.tokenizer.get_vocab() != embedder.tokenizer.get_vocab():
        raise UserError(
            f"{format_key_path(('stages', index, 'guide_model'))}: {stage.guide_model} has another tokenizer; "
            "the guide embeds the model's token ids, so it must share the model's tokenizer"
        )
    return guide.eval().requires_grad_(False)


def stage_teacher(stage: StageSpec, embedder, index: int) -> tuple[Teacher | None, Distillation | None]:
    """The stage's teacher and distillation terms, or (None, None) without `teacher:`."""
    spec = stage.teacher
    if spec is None:
        return None, None
    dtype = next(embedder.backbone.parameters()).dtype
    teacher = load_teacher(spec.model, format_key_path(("stages", index, "teacher", "model")), torch_dtype=dtype,
                           max_length=spec.max_length, batch_size=spec.batch_size, instructions=spec.instructions)
    distillation = Distillation(spec.kl_weight, spec.margin_weight, spec.temperature or stage.temperature,
                                spec.infonce_weight)
    return teacher, distillation


def late_interaction_term(stage: StageSpec, embedder) -> LateInteractionTerm | None:
    """The stage's late-interaction term, or None; the model's token head (made by `load_embedder`) is its width."""
    spec = stage.late_interaction
    if spec is None:
        return None
    return LateInteractionTerm(embedder.dim, embedder.add_token_head(spec.dim).dim, spec.weight)


def trainer_options(stage: StageSpec, embedder, index: int) -> dict:
    """`loss`, `guide`, `teacher` and `layers` for `ContrastiveTrainer`; records trained Matryoshka dims."""
    if stage.loss != "infonce":  # graded pairs: the recipe already refused every InfoNCE-only key
        loss = GradedPairLoss(stage.loss, Temperature(stage.temperature, learnable=stage.learnable_temperature),
                              angle_weight=stage.angle_weight)
        return {"loss": loss, "guide": None, "teacher": None, "layers": None}
    teacher, distillation = stage_teacher(stage, embedder, index)
    views, counts = matryoshka_plan(stage, embedder, index)
    loss = InfoNCELoss(
        stage.temperature,
        learnable_temperature=stage.learnable_temperature,
        hardness_weight=stage.hardness_weight,
        false_negative_margin=stage.false_negative_margin,
        views=views,
        segments=max(1, len(counts)),
        distillation=distillation,
        late_interaction=late_interaction_term(stage, embedder),
    )
    if views:
        full = 0 if not counts else (counts.index(None) if None in counts else -1)  # -1: full model not trained
        dims = sorted({d for segment, d in views if segment == full})
        embedder.config.matryoshka_dims = dims or None
    guide = load_guide(stage, embedder, index) if stage.guide_model else None
    return {"loss": loss, "guide": guide, "teacher": teacher, "layers": counts or None}

