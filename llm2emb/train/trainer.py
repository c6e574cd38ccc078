"""`ContrastiveTrainer`: transformers' Trainer driving an Embedder with GradCache and InfoNCE.

Trainer (through accelerate) keeps what it does well: DDP/FSDP wrapping, mixed precision, gradient accumulation,
optimizer, scheduler, logging, RNG and trainer-state checkpoints, resume and its data skip. This subclass changes
only what a contrastive embedder needs: the training step (GradCache over the whole contrastive batch, a loss whose
temperature may be a parameter outside the model), a stop on a non-finite loss before the optimizer step, and
checkpoints that are model folders (`Embedder.save_pretrained`) and appear on disk only once complete.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from llm2emb.config import is_model_folder
from llm2emb.errors import UserError
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.gradcache import chunks, gradcache_backward
from llm2emb.train.graded import GradedPairLoss
from llm2emb.train.losses import InfoNCELoss

LOSS_STATE_NAME = "contrastive_loss.safetensors"
"""The loss module's state (the temperature) inside each checkpoint, so a learnable temperature resumes too."""
STAGING_NAME = ".checkpoint-staging"
"""Checkpoints are assembled here and renamed to checkpoint-N only when every file is written."""


class ContrastiveTrainer(Trainer):
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
        self._staging_dir: str | None = None
        super().__init__(model=model, args=args, **kwargs)
        # Trainer sets `model.config.use_cache`; on an Embedder that is llm2emb.json's config, which must not grow
        # unknown keys. The flag belongs to the backbone, where False also stops training forwards building KV caches.
        vars(self.model.config).pop("use_cache", None)
        self.model.backbone.config.use_cache = self.args.use_cache
        self.contrastive_loss.to(self.args.device)
        if self.guide is not None:
            self.guide.to(self.args.device)
        if self.teacher is not None:
            self.teacher.to(self.args.device)

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """One-dataset batches from the dataset's own batch sampler (docs/CONTRACTS.md, "Training data")."""
        batch_sampler = getattr(self.train_dataset, "batch_sampler", None)
        if batch_sampler is None:
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
        )
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ loss and step
    def embed_fn(self, model):
        """The function GradCache embeds chunks with: the model, or its per-layer-count embeddings side by side."""
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
                raise NonFiniteLossError(self._non_finite_message(loss.item()))
            return loss * scale

        return loss_fn

    def _non_finite_message(self, value: float) -> str:
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        kept = f"the last checkpoint {last} is intact" if last else "no checkpoint had been written yet"
        return (
            f"loss became {value} at step {self.state.global_step + 1}; stopped before the optimizer step and "
            f"{kept} (try a lower learning rate, a larger temperature or fp32)"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Plain (no GradCache) loss, used by evaluation; training goes through `training_step`."""
        embed = self.embed_fn(model)
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
            return gradcache_backward(
                self.embed_fn(model),
                [inputs["queries"], inputs["documents"]],
                self._loss_fn(inputs, scale),
                self.gradcache_chunk,
                backward=self.accelerator.backward,
                no_sync=functools.partial(self.accelerator.no_sync, model),
            )

    def train(self, *args, **kwargs):
        """Trainer's loop; whatever happens, the model leaves it plainly bidirectional (the curriculum is over)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.bidirectional_warmup:
                self.model.set_future_attention(1.0)

    def create_optimizer(self, model=None):
        """Trainer's optimizer over the model, plus the loss's own parameters (no weight decay)."""
        optimizer = super().create_optimizer(model)
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
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a model folder (adapter or weights, pooling.safetensors, llm2emb.json) via `Embedder.save_pretrained`.

        `state_dict` (passed by Trainer under FSDP/DeepSpeed) is not used: the Embedder saves its live modules.
        """
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        embedder = self.accelerator.unwrap_model(self.model)
        if self._staging_dir is not None and Path(self._staging_dir) in output_dir.parents:
            # A checkpoint being assembled may already hold other processes' rng_state_<rank>.pth, which
            # save_pretrained (it replaces the whole folder) would delete: save beside it and move the files in.
            beside = output_dir.with_name(output_dir.name + ".model")
            embedder.save_pretrained(beside, overwrite=True)
            output_dir.mkdir(parents=True, exist_ok=True)
            for item in beside.iterdir():
                os.replace(item, output_dir / item.name)
            beside.rmdir()
            return
        if output_dir.is_dir() and any(output_dir.iterdir()) and not is_model_folder(output_dir):
            raise UserError(f"{output_dir}: not empty and not a model folder; save the model into a folder of its own")
        embedder.save_pretrained(output_dir, overwrite=True)

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, assembled in a staging folder and renamed into place once every process is done.

        A crash mid-save leaves only the staging folder, which resume ignores (it does not match checkpoint-N).
        """
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_NAME
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            state = {k: v.detach().contiguous().cpu() for k, v in self.contrastive_loss.state_dict().items()}
            save_file(state, str(staging / name / LOSS_STATE_NAME))
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore adapter (or weights), pooler and loss state in place, so the optimizer's references stay valid."""
        embedder = self.model if model is None else model
        super()._load_from_checkpoint(resume_from_checkpoint, model=embedder.backbone)
        folder = Path(resume_from_checkpoint)
        if embedder.pooler.trainable:
            embedder.load_pooler_weights(folder)
        if (folder / LOSS_STATE_NAME).is_file():
            self.contrastive_loss.load_state_dict(load_file(str(folder / LOSS_STATE_NAME)))
