"""The model folder (docs/ARCHITECTURE.md, "The model folder"): what `Embedder.save_pretrained` writes and
`Embedder.from_pretrained` reads back, kept side by side so the two stay symmetric, as sentence-transformers'
`save`/`load` and peft's `save_pretrained`/`from_pretrained` are.

A folder holds the backbone (full weights, or a PEFT adapter naming its base), the tokenizer, the weights of the
modules beside the backbone (a trainable pooler, the late-interaction head) and llm2emb.json, which is written last
and carries the digests the load checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm2emb.errors import UserError
from llm2emb.model.backbone import BaseRef, is_peft, load_backbone, load_tokenizer, resolve_base
from llm2emb.model.config import CONFIG_NAME, EmbedderConfig, is_model_folder
from llm2emb.model.prompts import Prompts
from llm2emb.model.tokenization import PromptTokenizer
from llm2emb.model.weights import refuse_damaged
from llm2emb.pooling import as_pooling_spec, pooler_spec

Embedder = torch.nn.Module
"""What these functions take: an `llm2emb.model.embedder.Embedder` (named here without importing it, which would be a cycle)."""


def load_folder(assemble: Callable[..., Embedder], folder: Path, pooling, attention, torch_dtype, device,
                attn_implementation, quantization, causal_sink) -> Embedder:
    """An Embedder from a model folder (`assemble` is `Embedder.assemble`); a requested attention, causal sink or
    pooling the folder was not built with is refused, never silently swapped."""
    refuse_damaged(folder, "re-convert or re-train it (a training run's last intact checkpoint is a model folder too)")
    config = EmbedderConfig.load(folder)
    if attention is not None and attention != config.attention:
        raise UserError(f"{folder}: built with attention {config.attention!r}; cannot load it as {attention!r}")
    if causal_sink is not None and causal_sink != config.causal_sink:
        raise UserError(f"{folder}: built with causal_sink {str(config.causal_sink).lower()}; cannot load it with "
                        f"causal_sink {str(causal_sink).lower()} (convert the base again to change it)")
    if pooling is not None:
        wanted = as_pooling_spec(pooling)
        if wanted.get("type") != config.pooling.get("type"):
            raise UserError(
                f"{folder}: built with pooling {config.pooling.get('type')!r}; "
                f"pooling={wanted.get('type')!r} conflicts (convert the base again to change it)"
            )
    if config.backbone == "adapter":
        from peft import PeftModel

        base = resolve_adapter_base(folder, config.base)
        backbone = load_backbone(base, config.attention, torch_dtype, attn_implementation, device, quantization)
        backbone = PeftModel.from_pretrained(backbone, str(folder), is_trainable=False)
    else:
        backbone = load_backbone(BaseRef(str(folder)), config.attention, torch_dtype, attn_implementation, device,
                                 quantization)
    tokenizer = load_tokenizer(BaseRef(str(folder)), config.padding_side)
    try:
        embedder = assemble(backbone.eval(), tokenizer, config)
        load_head_weights(embedder, folder)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # values of the right type but no model
        raise UserError(f"{folder}/{CONFIG_NAME}: describes no model this llm2emb can build from the folder "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    return embedder


def load_head_weights(embedder: Embedder, folder: str | Path) -> None:
    """The weights of `embedder.head_modules()` from a model folder or a checkpoint."""
    for attribute, name, needs in embedder.head_modules():
        path = Path(folder) / name
        if not path.is_file():
            raise UserError(f"{folder}: {needs} but {name} is missing")
        getattr(embedder, attribute).load_state_dict(load_file(str(path)))


def load_weights(embedder: Embedder, folder: str | Path) -> None:
    """A saved folder's trained weights into a live Embedder, in place (optimizer references stay valid): its
    adapter when the backbone is a PEFT model, else its full backbone weights; and its heads'."""
    from peft import set_peft_model_state_dict
    from transformers.trainer_utils import load_sharded_checkpoint

    folder = Path(folder)
    if is_peft(embedder.backbone):
        result = set_peft_model_state_dict(embedder.backbone, load_file(str(folder / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{folder}: adapter does not fit this model ({result.unexpected_keys[:3]})")
    elif (folder / "model.safetensors").is_file():
        embedder.backbone.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    else:
        load_sharded_checkpoint(embedder.backbone, str(folder))
    load_head_weights(embedder, folder)


def folder_config(embedder: Embedder) -> EmbedderConfig:
    """The llm2emb.json a save writes (before its digests): the live config with what the parts say of themselves
    (pooler arguments, token head, adapter or full weights), which may have changed since loading."""
    config = EmbedderConfig(**{**embedder.config.__dict__})
    config.pooling = pooler_spec(embedder.pooler)
    config.token_dim = embedder.token_head.dim if embedder.token_head is not None else None
    config.backbone = "adapter" if is_peft(embedder.backbone) else "weights"
    return config


def write_folder(embedder: Embedder, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Every file of the model folder into `folder` (a staging copy; llm2emb.json last). `state_dict`: the
    Embedder's full weights when its live parameters are shards (FSDP)."""
    config = folder_config(embedder)
    backbone_state = None if state_dict is None else submodule_state(state_dict, "backbone")
    # PEFT keeps only the adapter's entries of a given state dict; transformers saves all of them
    embedder.backbone.save_pretrained(str(folder), state_dict=backbone_state)
    embedder.tokenizer.save_pretrained(str(folder))
    for attribute, name, _ in embedder.head_modules():
        module = getattr(embedder, attribute)
        state = module.state_dict() if state_dict is None else submodule_state(state_dict, attribute)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / name))
    config.save(folder)


def submodule_state(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of a module's state dict that belong to its child `name`, keyed as the child's own."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def adapter_base_reference(folder: Path, base: str | None) -> str:
    """The adapter's base as written in llm2emb.json (`base`), else in adapter_config.json; a path relative to the
    folder comes back absolute, a hub id or asset alias as it is."""
    if base is None:
        adapter_config = json.loads((Path(folder) / "adapter_config.json").read_text())
        base = adapter_config.get("base_model_name_or_path")
    if base is None:
        raise UserError(f"{folder}: adapter folder names no base model")
    candidate = Path(folder) / Path(base).expanduser()
    return str(candidate.resolve()) if candidate.exists() else base


def resolve_adapter_base(folder: Path, base: str | None) -> BaseRef:
    """Where the adapter's base loads from (see `adapter_base_reference`)."""
    return resolve_base(adapter_base_reference(folder, base))


def load_prompt_tokenizer(
    path_or_id: str | Path, pooling: str | dict[str, Any] | None = None, max_length: int | None = None
) -> PromptTokenizer:
    """The `prompt_tokenizer` that `Embedder.from_pretrained(path_or_id, pooling=...)` would have, without weights:
    a model folder's templates and pooling, else the defaults (for `llm2emb train --check`)."""
    from llm2emb.pooling import POOLERS

    if is_model_folder(path_or_id):
        config = EmbedderConfig.load(Path(path_or_id))
    else:
        config = EmbedderConfig(base=str(path_or_id))
        if pooling is not None:
            config.pooling = as_pooling_spec(pooling)
    kind = config.pooling.get("type")
    if kind not in POOLERS:
        raise UserError(f"pooling: unknown type {kind!r}; choose one of {sorted(POOLERS)}")
    tokenizer = load_tokenizer(BaseRef(str(path_or_id)) if is_model_folder(path_or_id) else resolve_base(path_or_id),
                               config.padding_side)
    return PromptTokenizer(tokenizer, Prompts(config.query_template, config.document_template, config.text_template),
                           POOLERS[kind].needs_eos, max_length or config.max_length)
