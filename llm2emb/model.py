"""`Embedder`: a backbone, a pooler and prompts; the one object users encode with, train and save."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from llm2emb.backbone import BaseRef, load_backbone, load_tokenizer, resolve_base, verify_attention
from llm2emb.config import POOLING_WEIGHTS_NAME, EmbedderConfig, is_model_folder
from llm2emb.errors import UserError
from llm2emb.pooling import Pooler, build_pooler, pooler_spec
from llm2emb.prompts import Prompt, Prompts

PROGRESS_BAR_MIN_TEXTS = 1000
"""`encode` shows a progress bar from this many texts on, unless told otherwise."""


class Embedder(nn.Module):
    """Backbone + pooler + prompts. `forward` keeps gradients (training); `encode` is the fast inference path."""

    def __init__(self, backbone: nn.Module, tokenizer, pooler: Pooler, config: EmbedderConfig):
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.tokenizer = tokenizer
        self.config = config

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        pooling: str | dict[str, Any] | None = None,
        attention: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        **pooling_kwargs: Any,
    ) -> Embedder:
        """Load an llm2emb folder, or make an Embedder from a base (hub id, HF folder, .gguf, asset alias).

        Every load verifies the attention mode (see `backbone.verify_attention`).
        """
        if pooling_kwargs:
            pooling = {"type": pooling or "mean", **pooling_kwargs} if not isinstance(pooling, dict) else pooling
        if is_model_folder(path_or_id):
            return cls._load_folder(Path(path_or_id), pooling, attention, torch_dtype, device, attn_implementation)
        base = resolve_base(path_or_id)
        config = EmbedderConfig(base=str(path_or_id), attention=attention or "bidirectional")
        if pooling is not None:
            config.pooling = {"type": pooling} if isinstance(pooling, str) else dict(pooling)
        backbone = load_backbone(base, config.attention, torch_dtype, attn_implementation, device)
        tokenizer = load_tokenizer(base, config.padding_side)
        return cls._assemble(backbone, tokenizer, config, weights_dir=None)

    @classmethod
    def _load_folder(cls, folder, pooling, attention, torch_dtype, device, attn_implementation) -> Embedder:
        config = EmbedderConfig.load(folder)
        if attention is not None and attention != config.attention:
            raise UserError(f"{folder}: built with attention {config.attention!r}; cannot load it as {attention!r}")
        if pooling is not None:
            wanted = {"type": pooling} if isinstance(pooling, str) else dict(pooling)
            if wanted.get("type") != config.pooling.get("type"):
                raise UserError(
                    f"{folder}: built with pooling {config.pooling.get('type')!r}; "
                    f"pooling={wanted.get('type')!r} conflicts (convert the base again to change it)"
                )
        if config.backbone == "adapter":
            from peft import PeftModel

            base = resolve_adapter_base(folder, config.base)
            backbone = load_backbone(base, config.attention, torch_dtype, attn_implementation, device)
            backbone = PeftModel.from_pretrained(backbone, str(folder), is_trainable=False)
        else:
            backbone = load_backbone(BaseRef(str(folder)), config.attention, torch_dtype, attn_implementation, device)
        tokenizer = load_tokenizer(BaseRef(str(folder)), config.padding_side)
        return cls._assemble(backbone.eval(), tokenizer, config, weights_dir=folder)

    @classmethod
    def _assemble(cls, backbone, tokenizer, config: EmbedderConfig, weights_dir: Path | None) -> Embedder:
        verify_attention(backbone, config.attention)
        shape = _base_config(backbone)
        pooler = build_pooler(config.pooling, shape.hidden_size, shape.num_hidden_layers)
        config.pooling = pooler_spec(pooler)
        if pooler.trainable and weights_dir is not None:
            path = weights_dir / POOLING_WEIGHTS_NAME
            if not path.is_file():
                raise UserError(f"{weights_dir}: pooling {pooler.name!r} is trainable but {POOLING_WEIGHTS_NAME} is missing")
            pooler.load_state_dict(load_file(str(path)))
        device = next(backbone.parameters()).device
        return cls(backbone, tokenizer, pooler.to(device), config).eval()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def prompts(self) -> Prompts:
        return Prompts(self.config.query_template, self.config.document_template)

    @property
    def dim(self) -> int:
        return self.pooler.output_dim

    # ------------------------------------------------------------------ tokenisation
    def tokenize(
        self,
        texts: Sequence[str],
        instructions: str | Sequence[str | None] | None = None,
        max_length: int | None = None,
        kind: str = "query",
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and pool mask (1 on the text's own tokens, plus EOS if appended).

        `kind` picks the template the instruction goes through: "query" or "document".
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(texts)
        render = self.prompts.query if kind == "query" else self.prompts.document
        prompts = [render(text, instruction) for text, instruction in zip(texts, instructions, strict=True)]
        rows = [self._tokenize_prompt(p, max_length or self.config.max_length) for p in prompts]
        return self._pad(rows)

    def _tokenize_prompt(self, prompt: Prompt, max_length: int) -> tuple[list[int], list[int]]:
        needs_eos = self.pooler.needs_eos
        encoded = self.tokenizer(
            prompt.string,
            add_special_tokens=True,
            truncation=True,
            max_length=max_length - int(needs_eos),
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        ids = list(encoded["input_ids"])
        pool = [
            int(not special and end > prompt.text_start and start < prompt.text_end)
            for (start, end), special in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])
        ]
        if needs_eos:
            ids.append(self.tokenizer.eos_token_id)
            pool.append(1)
        return ids, pool

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad_id = self.tokenizer.pad_token_id
        left = self.config.padding_side == "left"
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        pool_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, pool) in enumerate(rows):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
            pool_mask[i, span] = torch.tensor(pool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled vectors (B, d), not normalised, with gradients: the training path."""
        attention_mask = batch["attention_mask"].to(self.device)
        # Positions count real tokens only, so left padding gives the same positions as right padding.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        out = self.backbone(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=self.pooler.needs_all_layers,
        )
        pooler_dtype = next(self.pooler.parameters(), torch.empty(0)).dtype
        all_layers = None
        if self.pooler.needs_all_layers:
            all_layers = tuple(h.to(pooler_dtype) for h in out.hidden_states[1:])
        pool_mask = batch["pool_mask"].to(self.device)
        return self.pooler(out.last_hidden_state.to(pooler_dtype), pool_mask, all_layers)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool | None = None,
        dim: int | None = None,
        show_progress_bar: bool | None = None,
        kind: str = "query",
    ) -> np.ndarray:
        """Embeddings (n, d) as float32 numpy, L2-normalised, in the order of `texts`.

        Texts are sorted by length before batching so each batch pads little. `dim` keeps the first
        `dim` components (Matryoshka truncation) before normalising.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if dim is not None and not 0 < dim <= self.dim:
            raise UserError(f"dim must be between 1 and {self.dim}, got {dim}")
        normalize = self.config.normalize if normalize is None else normalize
        if show_progress_bar is None:
            show_progress_bar = len(texts) >= PROGRESS_BAR_MIN_TEXTS
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        result = np.zeros((len(texts), dim or self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, disable=not show_progress_bar, desc="encode", unit="batch"):
            index = order[start : start + batch_size]
            batch = self.tokenize([texts[i] for i in index], instruction, kind=kind)
            vectors = self.forward(batch).float()
            if dim is not None:
                vectors = vectors[:, :dim]
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
            result[index] = vectors.cpu().numpy()
        self.train(was_training)
        return result

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        """Queries get the instruction (the folder's default when None) through the query template."""
        return self.encode(texts, instruction=instruction or self.config.default_query_instruction, **kwargs)

    def encode_documents(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        """Documents get no instruction unless the folder or the call sets one."""
        instruction = instruction or self.config.default_document_instruction
        return self.encode(texts, instruction=instruction, kind="document", **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the model folder (DESIGN.md §2) atomically: into a temporary sibling, then renamed."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise UserError(f"{directory}: folder exists and is not empty (pass overwrite to replace it)")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        staging.chmod(0o777 & ~_umask())
        try:
            self._write(staging)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    def _write(self, folder: Path) -> None:
        config = EmbedderConfig(**{**self.config.__dict__})
        config.pooling = pooler_spec(self.pooler)
        if is_peft(self.backbone):
            config.backbone = "adapter"
            self.backbone.save_pretrained(str(folder))
        else:
            config.backbone = "weights"
            self.backbone.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        if self.pooler.trainable:
            state = {k: v.detach().contiguous().cpu() for k, v in self.pooler.state_dict().items()}
            save_file(state, str(folder / POOLING_WEIGHTS_NAME))
        config.save(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_peft(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def _base_config(backbone: nn.Module):
    return backbone.get_base_model().config if is_peft(backbone) else backbone.config


def resolve_adapter_base(folder: Path, base: str | None) -> BaseRef:
    """The adapter's base: llm2emb.json's `base`, else adapter_config.json's; relative paths from the folder."""
    if base is None:
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        base = adapter_config.get("base_model_name_or_path")
    if base is None:
        raise UserError(f"{folder}: adapter folder names no base model")
    candidate = folder / base
    return resolve_base(candidate if candidate.exists() else base)
