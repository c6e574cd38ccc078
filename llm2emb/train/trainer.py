"""`ContrastiveTrainer`: the contrastive objective (InfoNCE or graded pairs) on an `EmbedderTrainer`.

It changes only what a contrastive embedder needs: the training step (GradCache over the whole contrastive batch,
a loss whose temperature may be a parameter outside the model, a guide's or a teacher's embeddings of the batch,
the causal-to-bidirectional curriculum) and two stops before the optimizer step: on a non-finite loss, and on
embeddings that collapsed into one vector (train/collapse.py). Each logged step also reports the batch's spread
(`embedding_cosine`, the mean cosine between its different texts) and `chance_loss`, the loss at uniform scores.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from llm2emb.errors import UserError
from llm2emb.model.spread import mean_cosine
from llm2emb.train.collapse import BatchSpread, CollapseError, CollapseGuard
from llm2emb.train.embedder_trainer import EmbedderTrainer
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.gradcache import chunks, gradcache_backward
from llm2emb.train.graded import GradedPairLoss
from llm2emb.train.late_loss import pack
from llm2emb.train.layer_rates import split_by_depth
from llm2emb.train.losses import InfoNCELoss
from llm2emb.train.run_folder import last_checkpoint


class ContrastiveTrainer(EmbedderTrainer):
    """Trainer for the training batch of docs/CONTRACTS.md; `model` is an `Embedder`.

    ``gradcache_chunk``: rows embedded at once (None: the whole batch in one forward). ``loss``: the contrastive
    loss module (InfoNCE, or a graded-pair loss that also receives the batch's ``scores``); its trainable parameters (a learnable temperature) join the optimizer without weight decay.
    ``guide``: a frozen Embedder sharing the model's tokenizer (GISTEmbed); it embeds the same token ids without
    gradient and the loss masks the negatives it scores above the positive. ``teacher``: a `Teacher`
    (llm2emb.train.teacher) for a loss with distillation; it embeds the batch's raw texts (``texts``, from
    `ContrastiveCollator(keep_texts=True)`) once per text, before GradCache's passes. ``layers``: layer counts (None: all)
    for 2D Matryoshka; each row is then embedded once per count and the embeddings are packed side by side, one
    loss segment each (`InfoNCELoss(segments=len(layers))`), so GradCache caches them like one embedding.
    """

    def __init__(
        self,
        model,
        args,
        loss: InfoNCELoss | GradedPairLoss | None = None,
        gradcache_chunk: int | None = None,
        guide=None,
        teacher=None,
        layers: list[int | None] | None = None,
        bidirectional_warmup: int = 0,
        collapse_guard: CollapseGuard | bool = True,
        layer_lr_decay: float = 1.0,
        **kwargs,
    ):
        if gradcache_chunk is not None and gradcache_chunk < 1:
            raise UserError(f"gradcache_chunk must be at least 1, got {gradcache_chunk}")
        self.contrastive_loss = loss if loss is not None else InfoNCELoss()
        self.gradcache_chunk = gradcache_chunk
        self.guide = guide.eval().requires_grad_(False) if guide is not None else None
        self.teacher = teacher
        self.layers = list(layers) if layers else None
        self.bidirectional_warmup = bidirectional_warmup
        if not 0 < layer_lr_decay <= 1:
            raise UserError(f"layer_lr_decay must be in (0, 1], got {layer_lr_decay}")
        self.layer_lr_decay = layer_lr_decay
        super().__init__(model=model, args=args, **kwargs)
        if collapse_guard is True:
            collapse_guard = CollapseGuard(after_step=self.args.get_warmup_steps(self.args.max_steps))
        self.collapse_guard = collapse_guard or None
        self.batch_spread: tuple | None = None
        self.spread_window: list[BatchSpread] = []
        self.contrastive_loss.to(self.args.device)
        if self.guide is not None:
            self.guide.to(self.args.device)
        if self.teacher is not None:
            self.teacher.to(self.args.device)

    # ------------------------------------------------------------------ loss and step
    def embed_fn(self, model, inputs: dict[str, Any]):
        """The function GradCache embeds chunks of `inputs` with: the model; or its per-layer-count embeddings side
        by side; or, for a late-interaction loss, pooled and token vectors packed (train/late_loss.py), every chunk
        to the width of the batch's widest side so that chunks and processes concatenate."""
        if getattr(self.contrastive_loss, "late_interaction", None) is not None:
            width = max(inputs[side]["input_ids"].shape[1] for side in ("queries", "documents"))
            return lambda batch: pack(*model(batch, with_tokens=True), width)
        if not self.layers:
            return model
        return lambda batch: torch.cat([model(batch, layers=count) for count in self.layers], dim=-1)

    @torch.no_grad()
    def guide_embeddings(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The guide's query and document embeddings, chunk by chunk like the model's; {} without a guide."""
        if self.guide is None:
            return {}
        out = {}
        for side in ("queries", "documents"):
            size = self.gradcache_chunk or inputs[side]["input_ids"].shape[0]
            out[f"guide_{side}"] = torch.cat([self.guide(chunk) for chunk in chunks(inputs[side], size)])
        return out

    def teacher_embeddings(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The teacher's vectors of the batch's queries and documents (cached per text); {} without a teacher."""
        if self.teacher is None:
            return {}
        texts = inputs["texts"]
        device = inputs["query_ids"].device
        return {
            "teacher_queries": self.teacher.vectors(texts["queries"], "query", texts["instructions"]).to(device),
            "teacher_documents": self.teacher.vectors(texts["documents"], "document").to(device),
        }

    def _loss_fn(self, inputs: dict[str, Any], scale: float = 1.0):
        """The loss of the cached (or live) query and document embeddings; stops on NaN/inf before any backward."""
        frozen = {**self.guide_embeddings(inputs), **self.teacher_embeddings(inputs)}  # the guide's, the teacher's

        def loss_fn(embeddings: list[torch.Tensor]) -> torch.Tensor:
            loss = self.contrastive_loss(
                embeddings[0],
                embeddings[1],
                inputs["query_ids"],
                inputs["document_ids"],
                inputs.get("in_batch_negatives", True),
                **frozen,
                **({"scores": inputs["scores"]} if "scores" in inputs else {}),
            )
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self.non_finite_message(loss.item()))
            self.batch_spread = (loss.detach(), getattr(self.contrastive_loss, "chance", None),
                                 mean_cosine(self.pooled(embeddings[1]), inputs["document_ids"]))
            return loss * scale

        return loss_fn

    def pooled(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The pooled vectors of a batch's embeddings (late interaction packs token vectors beside them)."""
        late = getattr(self.contrastive_loss, "late_interaction", None)
        return late.unpack(embeddings)[0] if late is not None else embeddings

    def step_spread(self) -> BatchSpread:
        """The step's loss and spread, averaged over processes so every process's guard decides alike."""
        loss, chance, cosine = self.batch_spread
        values = self.accelerator.reduce(torch.stack([loss.float(), cosine.float()]), reduction="mean")
        return BatchSpread(loss=values[0].item(), chance=None if chance is None else float(chance),
                           cosine=values[1].item())

    def watch_spread(self) -> None:
        """Log the step's spread and let the collapse guard see it; a collapse stops here, before the optimizer step,
        naming the checkpoint to go back to."""
        spread = self.step_spread()
        self.spread_window.append(spread)
        if self.collapse_guard is None:
            return
        try:
            self.collapse_guard.observe(self.state.global_step + 1, spread)
        except CollapseError as exc:
            kept = last_checkpoint(Path(self.args.output_dir), quiet=True, before=self.collapse_guard.streak_start)
            where = f"{kept} predates it and is intact" if kept else "no checkpoint predates the collapse"
            warmup = self.args.get_warmup_steps(self.args.max_steps)
            hint = f"{where}; lower learning_rate ({self.args.learning_rate:g}) or lengthen warmup_steps ({warmup})"
            raise CollapseError(f"{exc}; {hint}", exc.step, exc.spread) from None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Plain (no GradCache) loss, used by evaluation; training goes through `training_step`."""
        embed = self.embed_fn(model, inputs)
        embeddings = [embed(inputs["queries"]), embed(inputs["documents"])]
        loss = self._loss_fn(inputs)(embeddings)
        return (loss, {"queries": embeddings[0], "documents": embeddings[1]}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """GradCache forward/backward of one contrastive batch; returns the detached loss scaled as Trainer's."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if self.bidirectional_warmup:  # step t of N attends to later tokens with weight t / N (0: causal)
            weight = min(1.0, self.state.global_step / self.bidirectional_warmup)
            self.accelerator.unwrap_model(model).set_future_attention(weight)
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            loss = gradcache_backward(
                self.embed_fn(model, inputs),
                [inputs["queries"], inputs["documents"]],
                self._loss_fn(inputs, scale),
                self.gradcache_chunk,
                backward=self.accelerator.backward,
                no_sync=functools.partial(self.accelerator.no_sync, model),
            )
        self.watch_spread()
        return loss

    def train(self, *args, **kwargs):
        """Trainer's loop, then the collapse guard's end-of-stage check (a stage whose loss ended at chance learned
        nothing); whatever happens, the model leaves it plainly bidirectional (the curriculum is over)."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            if self.bidirectional_warmup:
                self.model.set_future_attention(1.0)
        if self.collapse_guard is not None:
            try:
                self.collapse_guard.check_learned(self.state.global_step)
            except CollapseError as exc:
                hint = (f"lower learning_rate ({self.args.learning_rate:g}), lengthen warmup_steps "
                        f"({self.args.get_warmup_steps(self.args.max_steps)}) or train more steps")
                raise CollapseError(f"{exc}; {hint}", exc.step, exc.spread) from None
        return output

    def extra_state(self) -> dict:
        return dict(self.contrastive_loss.state_dict())

    def load_extra_state(self, state: dict) -> None:
        self.contrastive_loss.load_state_dict(state)

    def create_optimizer(self, model=None):
        """Trainer's optimizer over the model (its groups split by depth under layer-wise rate decay), plus the loss's
        own parameters (no weight decay)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.layer_lr_decay != 1.0:
            split_by_depth(optimizer, model if model is not None else self.model, self.model.num_layers,
                           self.layer_lr_decay)
        extra = [p for p in self.contrastive_loss.parameters() if p.requires_grad]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if extra and not any(id(p) in known for p in extra):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    # ------------------------------------------------------------------ logging
    def _track_num_input_tokens(self, inputs):
        """Tokens of queries and documents (Trainer looks for a top-level input_ids, which this batch has not)."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        key = "attention_mask" if mode == "non_padding" else "input_ids"
        count = sum(
            int(inputs[side]["attention_mask"].sum()) if key == "attention_mask" else inputs[side]["input_ids"].numel()
            for side in ("queries", "documents")
        )
        count = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.contrastive_loss.temperature.learnable:
            logs["temperature"] = round(self.contrastive_loss.temperature().item(), 6)
        if "loss" in logs and self.spread_window:  # the spread over the steps this loss averages
            cosines = [s.cosine for s in self.spread_window]
            logs["embedding_cosine"] = round(sum(cosines) / len(cosines), 4)
            if self.spread_window[-1].chance is not None:
                logs["chance_loss"] = round(self.spread_window[-1].chance, 4)
            self.spread_window = []
        super().log(logs, start_time)
