"""`Embedder`: a backbone, a pooler and prompts; the one object users encode with, train and save."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from llm2emb.attention import resolve_backend, set_causal_sink, use_varlen_attention
from llm2emb.backbone import BaseRef, load_backbone, load_tokenizer, resolve_base, verify_attention
from llm2emb.config import CONFIG_NAME, POOLING_WEIGHTS_NAME, EmbedderConfig, is_model_folder
from llm2emb.errors import UserError
from llm2emb.files import atomic_folder, refuse_non_empty
from llm2emb.late_interaction import TOKEN_HEAD_WEIGHTS_NAME, TokenHead
from llm2emb.packing import pack, token_budget_batches, unpack
from llm2emb.pooling import Pooler, as_pooling_spec, build_pooler, pooler_spec
from llm2emb.precision import check_precision, needs_ranges, quantize
from llm2emb.prompts import Prompts
from llm2emb.rope import extend_rope, parse_rope_scaling, rebuild_rotary, rope_window
from llm2emb.tokenization import PromptTokenizer, UnembeddableText, pad_rows
from llm2emb.weights import refuse_damaged

PROGRESS_BAR_MIN_TEXTS = 1000
"""`encode` shows a progress bar from this many texts on, unless told otherwise."""


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
        """auto | padded | packed | flash_attn | varlen_attn (llm2emb.attention); a runtime choice, not saved."""
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
        **pooling_kwargs: Any,
    ) -> Embedder:
        """Load an llm2emb folder, or make an Embedder from a base (hub id, HF folder, .gguf, asset alias).

        Every load verifies the attention mode (see `backbone.verify_attention`). `attention_backend` picks padded
        or packed batches (see `set_attention_backend`); a choice that cannot run here fails at load.
        `quantization` (4bit | 8bit, CUDA and bitsandbytes) loads the base quantized, for QLoRA training.
        `rope_scaling` ("yarn:4", or {"method": pi | ntk | yarn, "factor": 4}) stretches RoPE for texts beyond the
        trained window (llm2emb.rope); a folder saved with it keeps it.
        `causal_sink` (llm2emb.attention): None keeps a folder's choice and turns it on for a bidirectional base.
        """
        rope_scaling = parse_rope_scaling(rope_scaling)
        if pooling_kwargs:
            pooling = {"type": pooling or "mean", **pooling_kwargs} if not isinstance(pooling, dict) else pooling
        if is_model_folder(path_or_id):
            embedder = cls._load_folder(Path(path_or_id), pooling, attention, torch_dtype, device, attn_implementation,
                                        quantization, causal_sink)
        else:
            base = resolve_base(path_or_id)
            attention = attention or "bidirectional"
            sink = attention == "bidirectional" if causal_sink is None else causal_sink
            config = EmbedderConfig(base=str(path_or_id), attention=attention, causal_sink=sink)
            if pooling is not None:
                config.pooling = as_pooling_spec(pooling)
            backbone = load_backbone(base, config.attention, torch_dtype, attn_implementation, device, quantization)
            tokenizer = load_tokenizer(base, config.padding_side)
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
        backbone_config = _base_model(self.backbone).config
        if requested or rope_window(backbone_config) is None:
            extend_rope(backbone_config, self.config.rope_scaling)
            rebuild_rotary(_decoder(self.backbone))

    @property
    def decoder_layer_class(self) -> str:
        """The class name of the backbone's decoder layers (FSDP wraps each one as a unit)."""
        return type(_decoder(self.backbone).layers[0]).__name__

    @property
    def rope_window(self) -> int | None:
        """The trained window when RoPE is extended: longer texts get the stretched frequencies (llm2emb.rope)."""
        return rope_window(_base_model(self.backbone).config)

    @classmethod
    def _load_folder(cls, folder, pooling, attention, torch_dtype, device, attn_implementation, quantization,
                     causal_sink) -> Embedder:
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
            embedder = cls.assemble(backbone.eval(), tokenizer, config)
            embedder.load_head_weights(folder)
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # values of the right type but no model
            raise UserError(f"{folder}/{CONFIG_NAME}: describes no model this llm2emb can build from the folder "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
        return embedder

    @classmethod
    def assemble(cls, backbone, tokenizer, config: EmbedderConfig) -> Embedder:
        """An Embedder from loaded parts: the attention mode is verified and the pooler built (freshly initialised;
        `load_weights` puts trained weights in). The one place an Embedder is put together."""
        if config.causal_sink and config.attention != "bidirectional":
            raise UserError(f"causal_sink keeps the first token causal inside bidirectional attention; with attention "
                            f"{config.attention!r} there is nothing to keep")
        set_causal_sink(backbone, config.causal_sink)
        verify_attention(backbone, config.attention, causal_sink=config.causal_sink)
        shape = _base_model(backbone).config
        pooler = build_pooler(config.pooling, shape.hidden_size, shape.num_hidden_layers)
        config.pooling = pooler_spec(pooler)
        device = next(backbone.parameters()).device
        embedder = cls(backbone, tokenizer, pooler.to(device), config)
        if config.token_dim is not None:
            embedder.add_token_head(config.token_dim)
        return embedder.eval()

    def add_token_head(self, dim: int) -> TokenHead:
        """The late-interaction head of width `dim` (llm2emb.late_interaction), created freshly initialised when the
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
        for attribute, name, needs in self.head_modules():
            path = Path(folder) / name
            if not path.is_file():
                raise UserError(f"{folder}: {needs} but {name} is missing")
            getattr(self, attribute).load_state_dict(load_file(str(path)))

    def load_weights(self, folder: str | Path) -> None:
        """Put a saved model folder's trained weights into this live Embedder, in place (optimizer references stay
        valid): its adapter when the backbone is a PEFT model, else its full backbone weights; and its pooler's and
        late-interaction head's."""
        from peft import set_peft_model_state_dict
        from transformers.trainer_utils import load_sharded_checkpoint

        folder = Path(folder)
        if is_peft(self.backbone):
            result = set_peft_model_state_dict(self.backbone, load_file(str(folder / "adapter_model.safetensors")))
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"{folder}: adapter does not fit this model ({result.unexpected_keys[:3]})")
        elif (folder / "model.safetensors").is_file():
            self.backbone.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        else:
            load_sharded_checkpoint(self.backbone, str(folder))
        self.load_head_weights(folder)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def prompts(self) -> Prompts:
        return Prompts(self.config.query_template, self.config.document_template)

    @property
    def dim(self) -> int:
        return self.pooler.output_dim

    @property
    def base_config(self):
        """The transformers config of the backbone (under a PEFT wrapper, the base model's)."""
        return _base_model(self.backbone).config

    @property
    def num_layers(self) -> int:
        """Transformer layers of the backbone (the largest `layers=` value)."""
        return len(_decoder(self.backbone).layers)

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
            implementation = _base_model(self.backbone).config._attn_implementation
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

    @contextlib.contextmanager
    def _first_layers(self, layers: int | None) -> Iterator[None]:
        """Run only the first `layers` transformer layers (Matryoshka layers): the rest are not computed.

        The decoder's layer list is swapped for its first `layers` entries for the duration of the call; the
        final norm still runs on the last computed layer, so the result equals a checkpoint loaded with
        `num_hidden_layers=layers` (the Starbucks / 2D Matryoshka recipe). Not thread-safe across concurrent
        calls on the same Embedder; under DDP the skipped layers get no gradient (use find_unused_parameters).
        """
        if layers is None or layers == self.num_layers:
            yield
            return
        if not 1 <= layers <= self.num_layers:
            raise UserError(f"layers must be between 1 and {self.num_layers}, got {layers}")
        if self.pooler.needs_all_layers:
            raise UserError(f"pooling {self.pooler.name!r} reads every layer; it cannot run with layers={layers}")
        decoder = _decoder(self.backbone)
        full = decoder.layers
        decoder.layers = nn.ModuleList(list(full)[:layers])
        try:
            yield
        finally:
            decoder.layers = full

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
        loses tokens of its text only; a text left no token raises `UnembeddableText` (llm2emb.tokenization).
        `spans[i]` (characters of text i, or None) makes row i a situated chunk: the text is its context (a window
        of `max_length` tokens around the span, llm2emb.chunking) and only the span's tokens are pooled.
        """
        if spans is None:
            return self._pad(list(self._rows(texts, instructions, max_length, kind)))
        from llm2emb.chunking import chunk_windows

        if len(spans) != len(texts):
            raise ValueError(f"{len(spans)} spans for {len(texts)} texts")
        per_text = list(instructions) if isinstance(instructions, (list, tuple)) else [instructions] * len(texts)
        plain = [index for index, span in enumerate(spans) if span is None]
        rows: list = [None] * len(texts)
        try:
            for index, row in zip(plain, self._rows([texts[i] for i in plain], [per_text[i] for i in plain],
                                                     max_length, kind)):
                rows[index] = row
        except UnembeddableText as exc:  # name the caller's row, not its place among the plain ones
            raise UnembeddableText(plain[exc.index], exc.detail) from None
        for index, span in enumerate(spans):
            if span is not None:  # a situated row: its window is tokenized once, by the chunker
                [window] = chunk_windows(self.prompt_tokenizer, texts[index], [span], per_text[index], kind,
                                         max_length or self.config.max_length, index)
                rows[index] = (window.ids, window.pools[0])
        return self._pad(rows)

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """Templates, tokenizer and `max_length` under llm2emb.tokenization's rule: the text is cut, never the prompt."""
        return PromptTokenizer(self.tokenizer, self.prompts, self.pooler.needs_eos, self.config.max_length)

    def _rows(self, texts, instructions, max_length, kind) -> Iterator[tuple[list[int], list[int]]]:
        """(ids, pool mask) per text, unpadded."""
        for row in self.prompt_tokenizer.rows(texts, instructions, max_length, kind):
            yield row.ids, row.pool

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_rows(rows, self.tokenizer.pad_token_id, left=self.config.padding_side == "left")
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], layers: int | None = None,
                with_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled vectors (B, d), not normalised, with gradients: the training path.

        `with_tokens`: also the late-interaction vectors of the pooled tokens and their mask, (pooled, tokens
        (B, T, token_dim), mask (B, T)), from the same forward (a late-interaction stage trains both); it needs the
        token head (`add_token_head`).

        `layers=k` runs only the first k transformer layers (Matryoshka layers, see `_first_layers`). With a
        packed attention backend the batch's padding is dropped before the backbone and restored after it, so
        the pooler sees the same (B, T, d) states either way. With `pool_rows` (C,) in the batch, `pool_mask` has C
        rows and row c pools the states of input row `pool_rows[c]`: several vectors from one forward (situated
        chunks, llm2emb.chunking).
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
        with self._first_layers(layers):
            hidden, all_layers = self._states(input_ids, attention_mask, kernel)
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

    def _states(self, input_ids, attention_mask, kernel: str):
        """Last hidden states (B, T, d) and every layer's (or None), through padded or packed batches."""
        if kernel == "padded":
            return self._padded_states(input_ids, attention_mask)
        return self._packed_states(input_ids, attention_mask, kernel)

    def _padded_states(self, input_ids, attention_mask):
        # Positions count real tokens only, so left padding gives the same positions as right padding. Right-padded
        # rows already start at 0: the backbone's default positions (one shared row) are those, and its rotary
        # tables stay (1, T, d) instead of one copy per row.
        position_ids = None
        if self.config.padding_side == "left":
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        curriculum = {}
        if self.future_attention < 1.0:
            weight = self.future_attention
            curriculum["llm2emb_future_bias"] = math.log(weight) if weight > 0 else -math.inf
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=self.pooler.needs_all_layers,
            **curriculum,
        )
        all_layers = out.hidden_states[1:] if self.pooler.needs_all_layers else None
        return out.last_hidden_state, all_layers

    def _packed_states(self, input_ids, attention_mask, kernel):
        """One row of real tokens through the backbone; `cu_seq_lens_*` reach llm2emb.attention's varlen kernel."""
        packed = pack(input_ids, attention_mask)
        out = self.backbone(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            output_hidden_states=self.pooler.needs_all_layers,
            llm2emb_kernel=kernel,
            **packed.attention_kwargs(),
        )
        all_layers = None
        if self.pooler.needs_all_layers:
            all_layers = tuple(unpack(h, packed) for h in out.hidden_states[1:])
        return unpack(out.last_hidden_state, packed), all_layers

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool | None = None,
        dim: int | None = None,
        show_progress_bar: bool | None = None,
        kind: str = "query",
        max_tokens: int | None = None,
        layers: int | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        precision: str = "float32",
        ranges: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embeddings (n, d) as float32 numpy, L2-normalised, in the order of `texts`.

        Texts are tokenized, sorted by token count (longest first) and grouped so each batch pads little:
        `batch_size` caps the rows of a batch and `max_tokens` (optional) its tokens — rows x longest text when
        padded, the sum of lengths when packed — so short texts travel in large batches and long ones in small.
        `dim` keeps the first `dim` components (Matryoshka truncation) before normalising; `layers` runs only the
        first `layers` transformer layers. `on_batch(texts, tokens)` is called after each batch (progress reports).
        `precision` (float16, int8/uint8 with calibration `ranges`, binary/ubinary) returns compressed codes
        (llm2emb.precision).
        """
        self._check_output_options(batch_size, dim, precision, ranges)
        if max_tokens is not None and max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
        normalize = self.config.normalize if normalize is None else normalize
        if show_progress_bar is None:
            show_progress_bar = len(texts) >= PROGRESS_BAR_MIN_TEXTS
        # Every text is tokenized before sorting; numpy rows keep that at ~5 bytes a token for large corpora.
        rows = [(np.asarray(ids, np.int32), np.asarray(pool, np.int8)) for ids, pool in self._rows(texts, instruction, None, kind)]
        lengths = [len(ids) for ids, _ in rows]
        order = np.argsort([-n for n in lengths], kind="stable")
        packed = self._kernel() != "padded"
        groups = list(token_budget_batches([lengths[i] for i in order], max_tokens, batch_size, packed,
                                           boundary=self.rope_window))
        was_training = self.training
        self.eval()
        result = np.zeros((len(texts), dim or self.dim), dtype=np.float32)
        try:
            for group in tqdm(groups, disable=not show_progress_bar, desc="encode", unit="batch"):
                index = order[group]
                try:
                    vectors = self.forward(self._pad([rows[i] for i in index]), layers=layers).float()
                except UnembeddableText as exc:
                    raise UnembeddableText(int(index[exc.index]), exc.detail) from None
                result[index] = finish_vectors(vectors, dim, normalize, index)
                if on_batch is not None:
                    on_batch(len(index), int(sum(lengths[i] for i in index)))
        finally:
            self.train(was_training)
        return quantize(result, precision, ranges)

    @torch.inference_mode()
    def encode_chunks(
        self,
        documents: Sequence[str],
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        chunker: str | Callable[[str], list[tuple[int, int]]] = "sentences",
        window: int | None = None,
        instruction: str | None = None,
        kind: str = "document",
        batch_size: int = 8,
        normalize: bool | None = None,
        dim: int | None = None,
        show_progress_bar: bool | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        precision: str = "float32",
        ranges: np.ndarray | None = None,
    ) -> list[DocumentChunks]:
        """Situated chunks (llm2emb.chunking): each chunk of each document embedded in its document's context.

        `spans[i]` are character spans of `documents[i]`; without them `chunker` ("sentences", "words:N" or a
        callable text -> spans) makes them. Forwards are at most `window` tokens (default max_length). Returns one
        `DocumentChunks(spans, vectors)` per document, vectors (chunks, d) like `encode`'s. Documents get the
        folder's default document instruction unless `instruction` is given. `on_batch(chunks, tokens)` is called
        after each batch of forwards.
        """
        from llm2emb.chunking import check_spans, chunk_windows, chunker_from_spec

        self._check_output_options(batch_size, dim, precision, ranges)
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not a single string")
        if spans is not None and len(spans) != len(documents):
            raise UserError(f"{len(spans)} span lists for {len(documents)} documents")
        if kind == "document":
            instruction = instruction or self.config.default_document_instruction
        normalize = self.config.normalize if normalize is None else normalize
        chunk = None if spans is not None else chunker_from_spec(chunker)
        plans, windows = [], []
        for number, text in enumerate(documents):
            where = f"document {number}"
            own = check_spans(text, spans[number] if spans is not None else chunk(text), where)
            plans.append(own)
            for piece in chunk_windows(self.prompt_tokenizer, text, own, instruction, kind, window, number):
                windows.append((number, piece))
        offsets = np.cumsum([0] + [len(own) for own in plans])
        result = np.zeros((int(offsets[-1]), dim or self.dim), dtype=np.float32)
        order = np.argsort([-len(piece.ids) for _, piece in windows], kind="stable")
        batches = list(token_budget_batches([len(windows[i][1].ids) for i in order], None, batch_size, packed=False,
                                            boundary=self.rope_window))
        if show_progress_bar is None:
            show_progress_bar = len(windows) >= PROGRESS_BAR_MIN_TEXTS
        was_training = self.training
        self.eval()
        try:
            for members in tqdm(batches, disable=not show_progress_bar, desc="encode", unit="batch"):
                group = [windows[i] for i in order[members]]
                batch = self._pad([(piece.ids, piece.pools[0]) for _, piece in group])
                chunk_rows = [(row, number, member, pool) for row, (number, piece) in enumerate(group)
                              for member, pool in zip(piece.chunks, piece.pools)]
                # the same ids padded alike, so each chunk's pool mask lines up with its window's row
                batch["pool_mask"] = self._pad([(group[row][1].ids, pool) for row, _, _, pool in chunk_rows])["pool_mask"]
                batch["pool_rows"] = torch.tensor([row for row, _, _, _ in chunk_rows])
                targets = [int(offsets[number] + member) for _, number, member, _ in chunk_rows]
                vectors = self.forward(batch).float()
                result[targets] = finish_vectors(vectors, dim, normalize, [number for _, number, _, _ in chunk_rows])
                if on_batch is not None:
                    on_batch(len(chunk_rows), sum(len(piece.ids) for _, piece in group))
        finally:
            self.train(was_training)
        coded = quantize(result, precision, ranges)
        return [DocumentChunks(own, coded[offsets[i]:offsets[i + 1]]) for i, own in enumerate(plans)]

    @torch.inference_mode()
    def encode_tokens(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        kind: str = "query",
        batch_size: int = 32,
        normalize: bool = True,
    ) -> list[np.ndarray]:
        """Token-level vectors for late interaction (Chamfer / MaxSim, MUVERA in llm2emb.muvera): one array
        (tokens, width) per text, one row per token its vector pools (instructions left out). The width is the
        trained head's `token_dim` when the model has one (always normalised), else the hidden size: the last hidden
        states as they are."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        rows = list(self._rows(texts, instruction, None, kind))
        order = np.argsort([-len(ids) for ids, _ in rows], kind="stable")
        groups = token_budget_batches([len(rows[i][0]) for i in order], None, batch_size, packed=False,
                                      boundary=self.rope_window)
        result: list[np.ndarray] = [np.empty(0)] * len(rows)
        was_training = self.training
        self.eval()
        try:
            for group in groups:
                index = order[group]
                batch = self._pad([rows[i] for i in index])
                input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                hidden = self._states(input_ids, attention_mask, self._kernel())[0]
                if self.token_head is not None:
                    hidden = self.token_head(hidden)
                elif normalize:
                    hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
                else:
                    hidden = hidden.float()
                for row, text in enumerate(index):
                    result[text] = hidden[row][batch["pool_mask"][row].bool().to(hidden.device)].cpu().numpy()
        finally:
            self.train(was_training)
        return result

    def _check_output_options(self, batch_size: int, dim: int | None, precision: str, ranges) -> None:
        """The options every encode method takes, checked before any work."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if dim is not None and not 0 < dim <= self.dim:
            raise UserError(f"dim must be between 1 and {self.dim}, got {dim}")
        check_precision(precision)
        if needs_ranges(precision) and ranges is None:
            raise UserError(f"precision {precision} needs calibration ranges (llm2emb.precision.calibration_ranges)")

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
            self._write(staging, state_dict)
        return Path(directory)

    def folder_config(self) -> EmbedderConfig:
        """The llm2emb.json `save_pretrained` writes (before its digests): the live config with what the parts say of
        themselves (pooler arguments, token head, adapter or full weights), which may have changed since loading."""
        config = EmbedderConfig(**{**self.config.__dict__})
        config.pooling = pooler_spec(self.pooler)
        config.token_dim = self.token_head.dim if self.token_head is not None else None
        config.backbone = "adapter" if is_peft(self.backbone) else "weights"
        return config

    def _write(self, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        config = self.folder_config()
        backbone_state = None if state_dict is None else submodule_state(state_dict, "backbone")
        # PEFT keeps only the adapter's entries of a given state dict; transformers saves all of them
        self.backbone.save_pretrained(str(folder), state_dict=backbone_state)
        self.tokenizer.save_pretrained(str(folder))
        for attribute, name, _ in self.head_modules():
            module = getattr(self, attribute)
            state = module.state_dict() if state_dict is None else submodule_state(state_dict, attribute)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / name))
        config.save(folder)


@dataclass(frozen=True)
class DocumentChunks:
    """One document's chunks: their character spans and their vectors (one row per span)."""

    spans: list[tuple[int, int]]
    vectors: np.ndarray


def submodule_state(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of a module's state dict that belong to its child `name`, keyed as the child's own."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def finish_vectors(vectors: torch.Tensor, dim: int | None, normalize: bool, texts: Sequence[int]) -> np.ndarray:
    """Pooled vectors as encode returns them: truncated to `dim`, checked, normalised, numpy.

    A zero or non-finite row raises `UnembeddableText` naming its text (`texts[row]`): never a zero or NaN row.
    """
    if dim is not None:
        vectors = vectors[:, :dim]
    norms = vectors.norm(dim=-1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten().tolist()
    if bad:
        raise UnembeddableText(int(texts[bad[0]]), f"the model gave a vector of norm {norms[bad[0]].item()}")
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors.cpu().numpy()


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
    return PromptTokenizer(tokenizer, Prompts(config.query_template, config.document_template),
                           POOLERS[kind].needs_eos, max_length or config.max_length)




def is_peft(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def _base_model(backbone: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the backbone itself)."""
    return backbone.get_base_model() if is_peft(backbone) else backbone


def _decoder(backbone: nn.Module) -> nn.Module:
    """The module holding the transformer layer list (`AutoModel` is the decoder itself for these families)."""
    model = _base_model(backbone)
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise UserError(f"model_type {model.config.model_type!r} has no `layers` list; layers= is unsupported")
    return model


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
