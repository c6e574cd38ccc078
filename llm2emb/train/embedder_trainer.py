"""`EmbedderTrainer`: what every objective's Trainer shares when the model is an `Embedder`.

transformers' Trainer (through accelerate) keeps what it does well: DDP/FSDP wrapping, mixed precision, gradient
accumulation, optimizer, scheduler, logging, RNG and trainer-state checkpoints, resume and its data skip. This base
adds what an Embedder needs whatever the objective: batches from the dataset's own batch sampler, checkpoints that
are model folders (`Embedder.save_pretrained`) and appear on disk only once complete, and the message of a stop on
a non-finite loss. `ContrastiveTrainer` (train/trainer.py) and `MNTPTrainer` (train/mntp.py) build on it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from llm2emb.errors import UserError
from llm2emb.files import disk_full
from llm2emb.model.config import is_model_folder

STAGING_NAME = ".checkpoint-staging"
"""Checkpoints are assembled here and renamed to checkpoint-N only when every file is written."""
EXTRA_STATE_NAME = "contrastive_loss.safetensors"
"""A trainer's own state beside the model's inside each checkpoint (the contrastive loss's temperature), so a
learnable temperature resumes too. The name predates other objectives and stays for old checkpoints."""


class EmbedderTrainer(Trainer):
    """Trainer for an `Embedder` model; subclasses add the objective's loss (and, optionally, `extra_state`)."""

    def __init__(self, model, args, **kwargs):
        self._staging_dir: str | None = None
        super().__init__(model=model, args=args, **kwargs)
        # Trainer sets `model.config.use_cache`; on an Embedder that is llm2emb.json's config, which must not grow
        # unknown keys. The flag belongs to the backbone, where False also stops training forwards building KV caches.
        vars(self.model.config).pop("use_cache", None)
        self.model.backbone.config.use_cache = self.args.use_cache

    def extra_state(self) -> dict:
        """Tensors to keep beside the model in each checkpoint (none here)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` saved."""

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

    def kept_checkpoint(self) -> str:
        """What a stopped run still has: its last complete checkpoint, if any."""
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        return f"the last checkpoint {last} is intact" if last else "no checkpoint had been written yet"

    def non_finite_message(self, value: float) -> str:
        return (
            f"step {self.state.global_step + 1}: the loss became {value}; stopped before the optimizer step and "
            f"{self.kept_checkpoint()} (try a lower learning rate, a larger temperature or fp32)"
        )

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a model folder (adapter or weights, pooling.safetensors, llm2emb.json) via `Embedder.save_pretrained`.

        `state_dict`: the full weights Trainer gathers under FSDP, where the live modules hold only shards.
        """
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        embedder = self.accelerator.unwrap_model(self.model)
        if self._staging_dir is not None and Path(self._staging_dir) in output_dir.parents:
            # A checkpoint being assembled may already hold other processes' rng_state_<rank>.pth, which
            # save_pretrained (it replaces the whole folder) would delete: save beside it and move the files in.
            beside = output_dir.with_name(output_dir.name + ".model")
            embedder.save_pretrained(beside, overwrite=True, state_dict=state_dict)
            output_dir.mkdir(parents=True, exist_ok=True)
            for item in beside.iterdir():
                os.replace(item, output_dir / item.name)
            beside.rmdir()
            return
        if output_dir.is_dir() and any(output_dir.iterdir()) and not is_model_folder(output_dir):
            raise UserError(f"{output_dir}: not empty and not a model folder; save the model into a folder of its own")
        embedder.save_pretrained(output_dir, overwrite=True, state_dict=state_dict)

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
        except Exception as exc:
            if disk_full(exc, staging):
                raise UserError(f"{run_dir / name}: no space left on device while writing this checkpoint; "
                                f"{self.kept_checkpoint()}: free some space and continue with --resume") from exc
            raise
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            state = {k: v.detach().contiguous().cpu() for k, v in self.extra_state().items()}
            if state:
                save_file(state, str(staging / name / EXTRA_STATE_NAME))
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
        """Restore adapter (or weights), pooler, token head and extra state in place, so the optimizer's references
        stay valid.

        Under FSDP the live parameters are shards: the runner loaded the checkpoint's weights before the Trainer
        sharded the model, so only the extra state is restored here."""
        embedder = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        if not self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model=embedder.backbone)
            embedder.load_head_weights(folder)
        if (folder / EXTRA_STATE_NAME).is_file():
            self.load_extra_state(load_file(str(folder / EXTRA_STATE_NAME)))
