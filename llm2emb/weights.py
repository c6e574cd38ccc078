"""Loading a transformers checkpoint as llm2emb must: whole, or refused in one line, never quietly made up.

transformers fills every weight a checkpoint lacks with a fresh random initialisation and says so in a log line that
quiet logging hides; a base whose `model.safetensors` holds one unrelated tensor converted into a random-weight
embedder with exit 0 (issue 30). Every base, model, teacher, guide and generator llm2emb loads goes through
`load_checked`, which reads transformers' own loading report (`output_loading_info`) and refuses missing weights,
and which turns a damaged file (truncated safetensors, corrupt or code-carrying pickle) into one line naming it.
Pickles load with torch's `weights_only` (transformers' default), so a checkpoint carrying code is never run.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError
from llm2emb.files import damaged_file

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""What transformers reads a folder's weights from, in its order of preference."""
NOT_NEEDED = ("lm_head.",)
"""Checkpoint weights a headless embedder legitimately leaves unused (a causal LM's head): no warning."""
SHOWN = 3
"""Missing or unexpected weight names quoted in a message."""


def weights_file(path: str | Path, gguf_file: str | None = None) -> str:
    """The file a message should name for the weights of `path` (a folder, or a hub id as it is)."""
    folder = Path(path)
    if gguf_file:
        return str(folder / gguf_file)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    return str(path)


def refuse_damaged(folder: str | Path, what: str = "re-download it, or convert it again") -> None:
    """Refuse a local model folder with a truncated or corrupt file (cheap header and size checks, llm2emb.files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    problem = damaged_file(folder)
    if problem is not None:
        raise UserError(f"{folder}/{problem}; the folder is damaged: {what}")


def load_checked(model_class: Any, path: str | Path, gguf_file: str | None = None, **kwargs) -> Any:
    """`model_class.from_pretrained(path, **kwargs)` that refuses a checkpoint lacking weights the architecture needs
    (naming the file, how many of how many and the first few) and warns in one line about unused extra weights."""
    source = weights_file(path, gguf_file)
    if not gguf_file:
        refuse_damaged(path)
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}), **kwargs)
    except pickle.UnpicklingError:
        raise UserError(f"{source}: this pickle checkpoint holds more than weights (code or objects that torch's "
                        "weights-only loading refuses); llm2emb does not run it: convert it to safetensors where you "
                        "trust it") from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError" or "zip archive" in str(exc) or "unpickl" in str(exc).lower():
            raise UserError(f"{source}: the weights file is damaged ({str(exc).splitlines()[0][:120]}); "
                            "re-download it, or convert it again") from None
        raise
    names = list(model.state_dict())
    missing = [name for name in names if name in set(info.get("missing_keys", ()))]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(names)} weights the {type(model).__name__} architecture "
                        f"needs are missing ({', '.join(missing[:SHOWN])}{', ...' if len(missing) > SHOWN else ''}); "
                        "loading it would leave them random: re-download it, or check that it is this model's file")
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(NOT_NEEDED))
    if unexpected:
        logger.warning("%s: %d weights the %s architecture does not use were ignored (%s%s)", source, len(unexpected),
                       type(model).__name__, ", ".join(unexpected[:SHOWN]), ", ..." if len(unexpected) > SHOWN else "")
    return model
