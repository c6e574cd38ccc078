"""`llm2emb info`: what a model folder is, read from its files without loading the weights."""

from __future__ import annotations

import json
from pathlib import Path

from llm2emb.errors import UserError
from llm2emb.model.config import POOLING_WEIGHTS_NAME, EmbedderConfig, is_model_folder
from llm2emb.model.weights import refuse_damaged


def describe(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not is_model_folder(folder):
        raise UserError(f"{folder}: not an llm2emb model folder (no llm2emb.json)")
    refuse_damaged(folder, "re-convert or re-train it (a training run's last intact checkpoint is a model folder too)")
    config = EmbedderConfig.load(folder)
    backbone_config = folder / ("adapter_config.json" if config.backbone == "adapter" else "config.json")
    details = json.loads(backbone_config.read_text()) if backbone_config.is_file() else {}
    info = {
        "folder": str(folder),
        "base": config.base,
        "backbone": config.backbone,
        "model_type": details.get("model_type", "-"),
        "attention": config.attention,
        "causal_sink": "yes" if config.causal_sink else "no",
        "pooling": json.dumps(config.pooling),
        "max_length": config.max_length,
        "query_template": json.dumps(config.query_template),
        "text_template": json.dumps(config.text_template),
        "default_query_instruction": config.default_query_instruction or "-",
        "matryoshka_dims": config.matryoshka_dims or "-",
        "token_dim": config.token_dim or "-",
        "rope_scaling": (f"{config.rope_scaling['method']} x{config.rope_scaling['factor']:g}"
                         if config.rope_scaling else "-"),
    }
    if config.backbone == "adapter":
        info["lora"] = f"r={details.get('r')} alpha={details.get('lora_alpha')} targets={details.get('target_modules')}"
    else:
        info["hidden_size"] = details.get("hidden_size")
        info["layers"] = details.get("num_hidden_layers")
        info["is_causal"] = details.get("is_causal", "unset")
    info["pooler_weights"] = "yes" if (folder / POOLING_WEIGHTS_NAME).is_file() else "no"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    info["weights_mb"] = round(size / 2**20, 1)
    return info
