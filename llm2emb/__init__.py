"""llm2emb: decoder-only LLMs as bidirectional text embedders, trained with instruction-tuned contrastive learning."""

from llm2emb.config import EmbedderConfig
from llm2emb.errors import UserError, VerificationError
from llm2emb.model import Embedder

__all__ = ["Embedder", "EmbedderConfig", "UserError", "VerificationError"]
__version__ = "0.1.0"
