"""Which device a command runs on: the GPU when there is one (`--device auto`, the default of every inference
command), else the CPU; `cpu`, `cuda` or `cuda:N` to choose. Under torchrun each process takes its local rank's GPU.

Without this, `llm2emb encode` of a 7B model on a GPU machine ran on its CPU (issue 31): the model loads where
`Embedder.from_pretrained(device=...)` puts it, and nothing asked for the GPU.
"""

from __future__ import annotations

import os
import re

from llm2emb.errors import UserError

CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(choice: str = "auto") -> str:
    """The torch device string for `choice`; a GPU that is not there is refused in one line."""
    import torch

    choice = choice.strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    found = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if not found:
        raise UserError(f"--device {choice}: expected {CHOICES}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {choice}: no CUDA GPU is visible to torch here (use --device cpu or auto)")
    index = int(found.group(1)) if found.group(1) is not None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {choice}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return f"cuda:{index}"


def add_device_argument(parser) -> None:
    """The `--device` option every inference command shares."""
    parser.add_argument("--device", default="auto",
                        help=f"{CHOICES} (default auto: the GPU when there is one, under torchrun the local rank's)")
