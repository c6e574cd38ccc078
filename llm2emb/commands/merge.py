"""`llm2emb merge`: model souping (KaLM-Embedding-V2, Llama-Embed-Nemotron, LM-Cocktail) of models trained from one base.

The merged backbone is base + sum_i w_i * delta_i, with delta_i = s_i * B_i @ A_i the weight change of adapter i
(s_i = alpha_i / r_i) and the weights w_i normalised to sum to 1. Averaging the A and B matrices separately would
NOT give this (the mean of products is not the product of means), so the adapters are concatenated along the
rank: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], alpha = r = sum r_i. Then B @ A equals the
weighted sum of the deltas exactly, and the result is still a plain PEFT adapter on the same base (of rank
sum r_i). PEFT implements this as `add_weighted_adapter(combination_type="cat")`, which is used here.

Trainable pooler weights (latent attention, multi-layer) and late-interaction heads are averaged parameter by
parameter with the same weights; a pooler is not linear in its weights, and a head's output is normalised, so that
part is the usual soup approximation, not an identity.
Models with different bases, attention, pooling or templates are refused: their average means nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm2emb.errors import UserError
from llm2emb.model.config import EmbedderConfig, is_model_folder
from llm2emb.model.embedder import Embedder
from llm2emb.model.folder import adapter_base_reference

COMPARED = ("attention", "pooling", "query_template", "document_template", "text_template", "padding_side", "token_dim")
"""llm2emb.json keys that must agree between merged models (besides the base)."""


def parse_weights(text: str | None, count: int) -> list[float]:
    """'1,3' -> [0.25, 0.75]; None -> equal weights."""
    if text is None:
        return [1.0 / count] * count
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text}: expected comma-separated numbers, e.g. 0.5,0.5") from None
    if len(values) != count:
        raise UserError(f"--weights {text}: {len(values)} weights for {count} models")
    if any(not v > 0 for v in values):
        raise UserError(f"--weights {text}: weights must be positive")
    return [v / sum(values) for v in values]


def check_mergeable(folders: Sequence[Path]) -> list[EmbedderConfig]:
    """Every folder an llm2emb adapter folder of the same base, attention, pooling and templates; else UserError."""
    import json

    configs = []
    for folder in folders:
        if not is_model_folder(folder):
            raise UserError(f"{folder}: not an llm2emb model folder (no llm2emb.json)")
        config = EmbedderConfig.load(folder)
        if config.backbone != "adapter":
            raise UserError(f"{folder}: holds full weights, not a LoRA adapter; merge averages adapters of one base")
        adapter = json.loads((folder / "adapter_config.json").read_text())
        if adapter.get("use_dora") or adapter.get("use_rslora"):
            raise UserError(f"{folder}: DoRA / rsLoRA adapters cannot be merged exactly by concatenation")
        configs.append(config)
    first, first_base = configs[0], adapter_base_reference(Path(folders[0]), configs[0].base)
    for folder, config in zip(folders[1:], configs[1:]):
        base = adapter_base_reference(Path(folder), config.base)
        if base != first_base:
            raise UserError(f"{folder}: trained from {base}, but {folders[0]} from {first_base}; merge needs one base")
        for key in COMPARED:
            if getattr(config, key) != getattr(first, key):
                raise UserError(f"{folder}: {key} {getattr(config, key)!r} differs from {folders[0]}'s "
                                f"{getattr(first, key)!r}; only models of the same setup can be merged")
    return configs


def merge(models: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
          overwrite: bool = False, device: str | None = None) -> Path:
    """Write the weighted merge of `models` (llm2emb adapter folders of one base) to `out`, computed on `device`;
    see the module doc."""
    folders = [Path(m) for m in models]
    if len(folders) < 2:
        raise UserError("merge needs at least two model folders")
    weights = list(weights) if weights is not None else [1.0 / len(folders)] * len(folders)
    check_mergeable(folders)
    merged = Embedder.from_pretrained(folders[0], torch_dtype=torch.float32, device=device)
    backbone = merged.backbone
    names = [f"merge_{i}" for i in range(len(folders))]
    for name, folder in zip(names, folders):
        backbone.load_adapter(str(folder), adapter_name=name)
    backbone.set_adapter(names[0])
    backbone.delete_adapter("default")
    backbone.add_weighted_adapter(names, weights, adapter_name="default", combination_type="cat")
    backbone.set_adapter("default")
    for name in names:
        backbone.delete_adapter(name)
    for attribute, weights_file, _ in merged.head_modules():
        states = [load_file(str(folder / weights_file)) for folder in folders]
        getattr(merged, attribute).load_state_dict({key: sum(w * state[key].float() for w, state in zip(weights, states))
                                                    for key in states[0]})
    merged.config.base = adapter_base_reference(Path(folders[0]), merged.config.base)
    return merged.save_pretrained(out, overwrite=overwrite)
