"""Loading a transformers checkpoint as llm2emb must: whole, or refused in one line, never quietly made up.

transformers fills every weight a checkpoint lacks with a fresh random initialisation and says so in a log line that
quiet logging hides; a base whose `model.safetensors` holds one unrelated tensor converted into a random-weight
embedder with exit 0 (issue 30). Every base, model, teacher, guide and generator llm2emb loads goes through
`load_checked`, which reads transformers' own loading report (`output_loading_info`) and refuses missing weights,
and which turns a damaged file (truncated safetensors, corrupt or code-carrying pickle), or any other failure to
build the model from its files, into one line naming it. The cheap structural check of a whole folder
(`refuse_damaged`) runs once, where a user's reference becomes a folder (llm2emb.model.backbone.resolve_base, a model
folder's load, a sentence-transformers folder's), not again for each file loaded from it.
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
    (naming the file, how many of how many and the first few) and warns in one line about unused extra weights;
    any failure to load is a `UserError` naming the file."""
    source = weights_file(path, gguf_file)
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}), **kwargs)
    except pickle.UnpicklingError:
        raise UserError(f"{source}: this pickle checkpoint holds more than weights (code or objects that torch's "
                        "weights-only loading refuses); llm2emb does not run it: convert it to safetensors where you "
                        "trust it") from None
    except UserError:
        raise
    except Exception as exc:  # a user's files: a config whose values build no model, weights of other shapes, ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        if type(exc).__name__ == "SafetensorError" or "zip archive" in str(exc) or "unpickl" in str(exc).lower():
            raise UserError(f"{source}: the weights file is damaged ({first}); re-download it, or convert it "
                            "again") from None
        raise UserError(f"{source}: cannot load the model weights ({type(exc).__name__}: {first})") from None
    names = list(model.state_dict())
    absent = set(info.get("missing_keys", ()))
    missing = [name for name in names if name in absent]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(names)} weights the {type(model).__name__} architecture "
                        f"needs are missing ({', '.join(missing[:SHOWN])}{', ...' if len(missing) > SHOWN else ''}); "
                        "loading it would leave them random: re-download it, or check that it is this model's file")
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(NOT_NEEDED))
    if unexpected:
        logger.warning("%s: %d weights the %s architecture does not use were ignored (%s%s)", source, len(unexpected),
                       type(model).__name__, ", ".join(unexpected[:SHOWN]), ", ..." if len(unexpected) > SHOWN else "")
    return model
