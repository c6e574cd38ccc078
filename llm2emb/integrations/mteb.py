"""mteb's encoder protocol for llm2emb models, so `mteb.evaluate` runs any MTEB task on them.

mteb calls `encode(DataLoader, task_metadata=..., prompt_type=...)`; queries and documents are told apart by
`prompt_type`, which maps onto llm2emb's own asymmetry: queries go through `encode_queries` with an instruction
(the query template, instruction tokens left out of pooling), documents through `encode_documents` with none.
The instruction of a task is, in order: the one given for it in `instructions` (keyed by task name), the query
prompt in the task's metadata (mteb ships E5-style instructions for many tasks), else the model folder's default.
Symmetric tasks (STS, clustering, classification: no prompt type) get plain text unless `instructions` names the
task, as `llm2emb eval` does for STS, so the two harnesses give the same numbers.

    import mteb
    from llm2emb.integrations.mteb import MtebEncoder

    model = MtebEncoder("runs/quickstart/model")
    mteb.evaluate(model, mteb.get_tasks(["SciFact", "STSBenchmark"]))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from llm2emb.evaluate.encoders import as_encoder


class MtebEncoder(AbsEncoder):
    """An Embedder (or a model folder / base to load as one) seen through mteb's `EncoderProtocol`."""

    def __init__(
        self,
        model: Any,
        instructions: dict[str, str] | None = None,
        batch_size: int = 32,
        name: str | None = None,
        **load_kwargs: Any,
    ):
        if isinstance(model, (str, Path)):
            from llm2emb.model.embedder import Embedder

            name = name or f"llm2emb/{Path(model).name}"
            model = Embedder.from_pretrained(model, **load_kwargs)
        self.model = model
        self.instructions = dict(instructions or {})
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name or "llm2emb/model",
            revision="local",
            embed_dim=getattr(model, "dim", None),
            max_tokens=getattr(config, "max_length", None),
            similarity_fn_name=ScoringFunction.COSINE,
            framework=["PyTorch"],
            modalities=["text"],
        ))

    def instruction_for(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        """The instruction this task's texts of this prompt type get (None: plain text, or the model's default)."""
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        if prompt_type != PromptType.query:
            return None
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get(PromptType.query.value)
        return prompt or None

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        encoder = as_encoder(self.model, kwargs.get("batch_size") or self.batch_size)
        if prompt_type == PromptType.document:
            return encoder.encode_documents(texts)
        instruction = self.instruction_for(task_metadata, prompt_type)
        if prompt_type == PromptType.query:
            return encoder.encode_queries(texts, instruction=instruction)
        return encoder.encode(texts, instruction=instruction) if instruction else encoder.encode(texts)
