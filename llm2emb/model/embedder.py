"""`Embedder`: a backbone, a pooler and prompts; the one object users encode with, train and save.

The class is the facade: construction, attention control, `forward` and the public encode and save methods. The
model-folder format is llm2emb.model.folder, batching and encoding llm2emb.model.encoding, the padded and packed
forward paths llm2emb.model.hidden_states.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm2emb.errors import UserError
from llm2emb.files import atomic_folder, refuse_non_empty
from llm2emb.model import encoding
from llm2emb.model import folder as model_folder
from llm2emb.model.attention import resolve_backend, set_causal_sink, use_varlen_attention
from llm2emb.model.backbone import (
    base_model,
    check_vocabulary,
    decoder_of,
    load_backbone,
    load_tokenizer,
    resolve_base,
    verify_attention,
)
from llm2emb.model.config import POOLING_WEIGHTS_NAME, EmbedderConfig, is_model_folder
from llm2emb.model.encoding import DocumentChunks
from llm2emb.model.hidden_states import backbone_states, first_layers
from llm2emb.model.late_interaction import TOKEN_HEAD_WEIGHTS_NAME, TokenHead
from llm2emb.model.prompts import Prompts, default_text_template, text_template_for
from llm2emb.model.rope import extend_rope, parse_rope_scaling, rebuild_rotary, rope_window
from llm2emb.model.tokenization import PromptTokenizer, UnembeddableText, pad_rows
from llm2emb.pooling import Pooler, as_pooling_spec, build_pooler, pooler_spec


class Embedder(nn.Module):
    """Backbone + pooler + prompts. `forward` keeps gradients (training); `encode` is the fast inference path."""

    def __init__(self, backbone: nn.Module, tokenizer, pooler: Pooler, config: EmbedderConfig):
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.token_head: TokenHead | None = None
        """The trained late-interaction head (`add_token_head`), or None: token vectors are the hidden states."""
        self.tokenizer = tokenizer
        self.config = config
        self.attention_backend = "auto"
        """auto | padded | packed | flash_attn | varlen_attn (llm2emb.model.attention); a runtime choice, not saved."""
        self._resolved: tuple[tuple, str] | None = None
        self.future_attention = 1.0
        """How much a token attends to later tokens, 0 (causal) to 1 (bidirectional); below 1 only during a
        training curriculum (`set_future_attention`); a runtime choice, not saved."""

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
        attention_backend: str = "auto",
        quantization: str | None = None,
        rope_scaling: str | dict[str, Any] | None = None,
        causal_sink: bool | None = None,
        text_template: str | None = None,
        **pooling_kwargs: Any,
    ) -> Embedder:
        """Load an llm2emb folder, or make an Embedder from a base (hub id, HF folder, .gguf, asset alias).

        Every load verifies the attention mode (see `backbone.verify_attention`). `attention_backend` picks padded
        or packed batches (see `set_attention_backend`); a choice that cannot run here fails at load.
        `quantization` (4bit | 8bit, CUDA and bitsandbytes) loads the base quantized, for QLoRA training.
        `rope_scaling` ("yarn:4", or {"method": pi | ntk | yarn, "factor": 4}) stretches RoPE for texts beyond the
        trained window (llm2emb.model.rope); a folder saved with it keeps it.
        `causal_sink` (llm2emb.model.attention): None keeps a folder's choice and turns it on for a bidirectional base.
        `text_template` (llm2emb.model.prompts.text_template_for: chat | turn | bos | none | a template with {text}): None
        keeps a folder's and gives a base default_text_template; a folder is never loaded with another one.
        """
        rope_scaling = parse_rope_scaling(rope_scaling)
        if pooling_kwargs:
            pooling = {"type": pooling or "mean", **pooling_kwargs} if not isinstance(pooling, dict) else pooling
        if is_model_folder(path_or_id):
            embedder = model_folder.load_folder(cls.assemble, Path(path_or_id), pooling, attention, torch_dtype, device,
                                                attn_implementation, quantization, causal_sink)
            built_with = embedder.config.text_template
            if text_template is not None and text_template_for(text_template, embedder.tokenizer) != built_with:
                raise UserError(f"{path_or_id}: built with text template {built_with!r}; cannot load it with "
                                f"{text_template!r} (convert the base again to change it)")
        else:
            base = resolve_base(path_or_id)
            attention = attention or "bidirectional"
            sink = attention == "bidirectional" if causal_sink is None else causal_sink
            config = EmbedderConfig(base=str(path_or_id), attention=attention, causal_sink=sink)
            if pooling is not None:
                config.pooling = as_pooling_spec(pooling)
            backbone = load_backbone(base, config.attention, torch_dtype, attn_implementation, device, quantization)
            tokenizer = load_tokenizer(base, config.padding_side)
            check_vocabulary(backbone, tokenizer, str(path_or_id))
            try:
                config.text_template = (text_template_for(text_template, tokenizer) if text_template
                                        else default_text_template(tokenizer, sink))
            except UserError as exc:
                raise UserError(f"{path_or_id}: {exc}") from None
            embedder = cls.assemble(backbone, tokenizer, config)
        saved = embedder.config.rope_scaling
        if rope_scaling is not None and saved not in (None, rope_scaling):
            raise UserError(f"{path_or_id}: saved with rope scaling {saved}; cannot load it with {rope_scaling}")
        embedder.config.rope_scaling = saved or rope_scaling
        if embedder.config.rope_scaling is not None:
            embedder._extend_rope(requested=saved is None)
        embedder.set_attention_backend(attention_backend)
        return embedder

    def _extend_rope(self, requested: bool) -> None:
        """Apply config.rope_scaling to the backbone: one asked for now, or a saved one whose backbone config does
        not carry it yet (an adapter's base)."""
        backbone_config = base_model(self.backbone).config
        if requested or rope_window(backbone_config) is None:
            extend_rope(backbone_config, self.config.rope_scaling)
            rebuild_rotary(decoder_of(self.backbone))

    @property
    def decoder_layer_class(self) -> str:
        """The class name of the backbone's decoder layers (FSDP wraps each one as a unit)."""
        return type(decoder_of(self.backbone).layers[0]).__name__

    @property
    def rope_window(self) -> int | None:
        """The trained window when RoPE is extended: longer texts get the stretched frequencies (llm2emb.model.rope)."""
        return rope_window(base_model(self.backbone).config)

    @classmethod
    def assemble(cls, backbone, tokenizer, config: EmbedderConfig) -> Embedder:
        """An Embedder from loaded parts: the attention mode is verified and the pooler built (freshly initialised;
        `load_weights` puts trained weights in). The one place an Embedder is put together."""
        if config.causal_sink and config.attention != "bidirectional":
            raise UserError(f"causal_sink keeps the first token causal inside bidirectional attention; with attention "
                            f"{config.attention!r} there is nothing to keep")
        set_causal_sink(backbone, config.causal_sink)
        verify_attention(backbone, config.attention, causal_sink=config.causal_sink)
        shape = base_model(backbone).config
        pooler = build_pooler(config.pooling, shape.hidden_size, shape.num_hidden_layers)
        config.pooling = pooler_spec(pooler)
        device = next(backbone.parameters()).device
        embedder = cls(backbone, tokenizer, pooler.to(device), config)
        if config.token_dim is not None:
            embedder.add_token_head(config.token_dim)
        return embedder.eval()

    def add_token_head(self, dim: int) -> TokenHead:
        """The late-interaction head of width `dim` (llm2emb.model.late_interaction), created freshly initialised when the
        model has none; a model whose head has another width refuses (its token vectors would change meaning)."""
        if self.token_head is not None:
            if self.token_head.dim != dim:
                raise UserError(f"the model's late-interaction head is {self.token_head.dim}-dimensional; "
                                f"it cannot become {dim}-dimensional")
            return self.token_head
        self.token_head = TokenHead(self.base_config.hidden_size, dim).to(self.device)
        self.config.token_dim = dim
        return self.token_head

    def head_modules(self) -> list[tuple[str, str, str]]:
        """The modules beside the backbone that carry trained weights, each as (attribute, its weights file in a
        model folder, what needs that file): a trainable pooler and the late-interaction head."""
        modules = []
        if self.pooler.trainable:
            modules.append(("pooler", POOLING_WEIGHTS_NAME, f"pooling {self.pooler.name!r} is trainable"))
        if self.token_head is not None:
            modules.append(("token_head", TOKEN_HEAD_WEIGHTS_NAME,
                            f"llm2emb.json gives a {self.token_head.dim}-dimensional late-interaction head"))
        return modules

    def load_head_weights(self, folder: str | Path) -> None:
        """The weights of `head_modules` from a model folder or a checkpoint."""
        model_folder.load_head_weights(self, folder)

    def load_weights(self, folder: str | Path) -> None:
        """Put a saved model folder's trained weights into this live Embedder, in place (optimizer references stay
        valid): its adapter when the backbone is a PEFT model, else its full backbone weights; and its heads'."""
        model_folder.load_weights(self, folder)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def prompts(self) -> Prompts:
        return Prompts(self.config.query_template, self.config.document_template, self.config.text_template)

    @property
    def dim(self) -> int:
        return self.pooler.output_dim

    @property
    def base_config(self):
        """The transformers config of the backbone (under a PEFT wrapper, the base model's)."""
        return base_model(self.backbone).config

    @property
    def num_layers(self) -> int:
        """Transformer layers of the backbone (the largest `layers=` value)."""
        return len(decoder_of(self.backbone).layers)

    # ------------------------------------------------------------------ attention backend
    def set_attention_backend(self, backend: str = "auto") -> None:
        """Choose how `forward` and `encode` batch texts: padded rows, or one packed row and a varlen kernel.

        auto: a CUDA varlen kernel (flash-attn, else torch's varlen_attn) when usable, else packed sdpa on a CPU
        (padded while the causal-to-bidirectional curriculum runs), else padded.
        packed: the best packed kernel here, the sdpa one on a CPU. flash_attn / varlen_attn: that kernel or a
        one-line UserError saying why not. Checked now for the current device and dtype, and again whenever the
        model has moved since (auto then re-chooses).
        """
        self._resolved = None
        self._kernel(backend)
        self.attention_backend = backend

    def _kernel(self, backend: str | None = None) -> str:
        """`padded` or the packed kernel for the current device and dtype; switches the backbone when packed."""
        backend = backend or self.attention_backend
        parameter = next(self.backbone.parameters())
        key = (backend, parameter.device, parameter.dtype)
        if self._resolved is None or self._resolved[0] != key:
            implementation = base_model(self.backbone).config._attn_implementation
            kernel = resolve_backend(backend, parameter.device, parameter.dtype, implementation)
            if kernel != "padded":
                use_varlen_attention(self.backbone)
            self._resolved = (key, kernel)
        return self._resolved[1]

    @property
    def attention_kernel(self) -> str:
        """The kernel the next forward uses on the current device and dtype: `padded`, or a packed one (`sdpa`,
        `flash_attn`, `varlen_attn`); benchmarks record it next to their numbers."""
        return self._kernel()

    def set_future_attention(self, weight: float) -> None:
        """Scale attention to later tokens by `weight` (0: causal, 1: bidirectional): the soft causal-to-bidirectional
        curriculum (Conan-embedding-v2). A bidirectional model starts from the causal computation it was pretrained
        with and anneals to its own; the weights saved are those of a plain bidirectional model."""
        if not 0.0 <= weight <= 1.0:
            raise UserError(f"future attention weight must be between 0 and 1, got {weight}")
        if weight < 1.0 and self.config.attention != "bidirectional":
            raise UserError("the causal-to-bidirectional curriculum needs a bidirectional model")
        if weight < 1.0:
            use_varlen_attention(self.backbone)  # its padded path is sdpa, plus the bias on later tokens
        self.future_attention = float(weight)

    # ------------------------------------------------------------------ tokenisation
    def tokenize(
        self,
        texts: Sequence[str],
        instructions: str | Sequence[str | None] | None = None,
        max_length: int | None = None,
        kind: str = "query",
        spans: Sequence[tuple[int, int] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and pool mask (1 on the text's own tokens, plus EOS if appended).

        `kind` picks the template the instruction goes through: "query" or "document". A prompt over `max_length`
        loses tokens of its text only; a text left no token raises `UnembeddableText` (llm2emb.model.tokenization).
        `spans[i]` (characters of text i, or None) makes row i a situated chunk: the text is its context (a window
        of `max_length` tokens around the span, llm2emb.retrieval.chunking) and only the span's tokens are pooled.
        """
        if spans is None:
            return self.pad_batch([(row.ids, row.pool) for row in
                                   self.prompt_tokenizer.rows(texts, instructions, max_length, kind)])
        from llm2emb.retrieval.chunking import situated_rows

        return self.pad_batch(situated_rows(self.prompt_tokenizer, texts, instructions, max_length or self.config.max_length,
                                            kind, spans))

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """Templates, tokenizer and `max_length` under llm2emb.model.tokenization's rule: the text is cut, never the prompt."""
        return PromptTokenizer(self.tokenizer, self.prompts, self.pooler.needs_eos, self.config.max_length)

    def pad_batch(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """(ids, pool mask) rows as one padded batch of tensors, on the folder's padding side."""
        batch = pad_rows(rows, self.tokenizer.pad_token_id, left=self.config.padding_side == "left")
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], layers: int | None = None,
                with_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled vectors (B, d), not normalised, with gradients: the training path.

        `with_tokens`: also the late-interaction vectors of the pooled tokens and their mask, (pooled, tokens
        (B, T, token_dim), mask (B, T)), from the same forward (a late-interaction stage trains both); it needs the
        token head (`add_token_head`).

        `layers=k` runs only the first k transformer layers (Matryoshka layers, llm2emb.model.hidden_states.first_layers). With a
        packed attention backend the batch's padding is dropped before the backbone and restored after it, so
        the pooler sees the same (B, T, d) states either way. With `pool_rows` (C,) in the batch, `pool_mask` has C
        rows and row c pools the states of input row `pool_rows[c]`: several vectors from one forward (situated
        chunks, llm2emb.retrieval.chunking).
        """
        attention_mask = batch["attention_mask"].to(self.device)
        input_ids = batch["input_ids"].to(self.device)
        pool_mask = batch["pool_mask"].to(self.device)
        pool_rows = batch.get("pool_rows")
        empty = (pool_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:  # a pooler would return zeros (mean) or a pad token's state: refuse, never a silent garbage vector
            raise UnembeddableText(empty[0], "no token of the text is in the batch's pool mask")
        kernel = self._kernel()
        if kernel != "padded" and self.future_attention < 1.0:
            if self.attention_backend != "auto":
                raise UserError("the causal-to-bidirectional curriculum runs on padded batches; set attention_backend padded")
            kernel = "padded"  # auto's choice: the curriculum's bias needs the padded layout
        with first_layers(self.backbone, layers, self.pooler):
            hidden, all_layers = backbone_states(self.backbone, input_ids, attention_mask, kernel,
                                                 self.config.padding_side == "left", self.future_attention,
                                                 self.pooler.needs_all_layers)
        pooler_dtype = next(self.pooler.parameters(), torch.empty(0)).dtype
        if pool_rows is not None:
            pool_rows = pool_rows.to(self.device)
            hidden = hidden[pool_rows]
            all_layers = None if all_layers is None else tuple(h[pool_rows] for h in all_layers)
        if all_layers is not None:
            all_layers = tuple(h.to(pooler_dtype) for h in all_layers)
        pooled = self.pooler(hidden.to(pooler_dtype), pool_mask, all_layers)
        if not with_tokens:
            return pooled
        if self.token_head is None:
            raise UserError("token vectors for late interaction need the model's token head (add_token_head)")
        if pool_rows is not None:
            raise ValueError("with_tokens gives one row of token vectors per input row; it takes no pool_rows")
        return pooled, self.token_head(hidden), pool_mask

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden states (B, T, d) of a padded batch, on the current attention backend (token vectors)."""
        return backbone_states(self.backbone, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                               self._kernel(), self.config.padding_side == "left", self.future_attention)[0]

    # ------------------------------------------------------------------ inference (llm2emb.model.encoding)
    def encode(self, texts: Sequence[str], instruction: str | None = None, **options: Any) -> np.ndarray:
        """Embeddings (n, d) as float32 numpy, L2-normalised, in the order of `texts`, in length-sorted batches.
        Options (`batch_size`, `normalize`, `dim`, `kind`, `max_tokens`, `layers`, `precision`, ...):
        `llm2emb.model.encoding.encode_texts`."""
        return encoding.encode_texts(self, texts, instruction, **options)

    def encode_chunks(self, documents: Sequence[str], spans=None, **options: Any) -> list[DocumentChunks]:
        """Situated chunks: each chunk (given `spans`, or made by `chunker`) embedded in its document's context;
        one `DocumentChunks(spans, vectors)` per document (`llm2emb.model.encoding.encode_chunks`)."""
        return encoding.encode_chunks(self, documents, spans, **options)

    def encode_tokens(self, texts: Sequence[str], instruction: str | None = None, **options: Any) -> list[np.ndarray]:
        """Token-level vectors for late interaction, one (tokens, width) array per text
        (`llm2emb.model.encoding.encode_tokens`)."""
        return encoding.encode_tokens(self, texts, instruction, **options)

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        """Queries get the instruction (the folder's default when None) through the query template."""
        return self.encode(texts, instruction=instruction or self.config.default_query_instruction, **kwargs)

    def encode_documents(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        """Documents get no instruction unless the folder or the call sets one."""
        instruction = instruction or self.config.default_document_instruction
        return self.encode(texts, instruction=instruction, kind="document", **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path, overwrite: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model folder (docs/ARCHITECTURE.md, "The model folder") atomically: into a temporary sibling,
        then renamed.

        `state_dict`: this Embedder's full weights, keyed like its own `state_dict()`, for when the live parameters
        are shards (FSDP): the Trainer gathers them on every process and hands them to the one that saves.
        """
        refuse_non_empty(directory, overwrite, option="overwrite=True")
        with atomic_folder(directory) as staging:
            model_folder.write_folder(self, staging, state_dict)
        return Path(directory)

    def folder_config(self) -> EmbedderConfig:
        """The llm2emb.json `save_pretrained` writes (before its digests), from what the parts say of themselves."""
        return model_folder.folder_config(self)
