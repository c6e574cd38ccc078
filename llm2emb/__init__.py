"""llm2emb: decoder-only LLMs as bidirectional text embedders, trained with instruction-tuned contrastive learning.

`Embedder` is imported on first use (PEP 562), so `import llm2emb`, `llm2emb.errors` and `llm2emb --help` do not load
torch or transformers.
"""

from llm2emb.errors import UserError, VerificationError
from llm2emb.model.config import EmbedderConfig

__all__ = ["Embedder", "EmbedderConfig", "UserError", "VerificationError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Embedder":
        from llm2emb.model.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'llm2emb' has no attribute {name!r}")
