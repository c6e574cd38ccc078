"""Load any supported decoder as a bidirectional (or causal) backbone, and prove which one it is.

Since transformers 5.2 the decoder families below read `config.is_causal`: set to False on the config
object, their eager, sdpa, flex and flash paths all build a full (padding-only) mask, so no modeling
code is copied or patched (llm2vec's copies broke on every transformers release). The flag must be
set on the config object: `from_pretrained(..., is_causal=False)` raises and
`AutoConfig.from_pretrained(..., is_causal=False)` ignores it (docs/ARCHITECTURE.md, "Verified facts").

Other decoders are tried too, but every load runs `verify_attention`, a two-forward leak check, and
refuses a model whose attention stayed causal or whose padding leaks: a silent causal fallback costs
users of other tools weeks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llm2emb.errors import UserError, VerificationError
from llm2emb.model.weights import load_checked, refuse_damaged

logger = logging.getLogger(__name__)

VERIFIED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
"""Model types whose bidirectional mode was verified in eager and sdpa by tests/test_backbone.py."""

ATTENTION_MODES = ("bidirectional", "causal")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
"""A folder's tokenizer is in at least one of these (fast, SentencePiece, BPE vocab, tiktoken)."""


@dataclass(frozen=True)
class BaseRef:
    """Where a backbone's weights live: `path` for from_pretrained, plus a GGUF file name inside it."""

    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def model_kwargs(self) -> dict:
        """GGUF weights are dequantized into a plain dense model, so it saves and trains like any other."""
        if not self.gguf_file:
            return {}
        from transformers import GgufConfig

        return {**self.kwargs, "quantization_config": GgufConfig(dequantize=True)}


def resolve_base(reference: str | Path) -> BaseRef:
    """Turn a user's `--base` (hub id, folder, .gguf file or asset alias) into a from_pretrained target."""
    from llm2emb.assets import ASSETS, fetch_asset

    text = str(reference)
    if text in ASSETS:
        return resolve_base(fetch_asset(text))
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{text}: GGUF file not found")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError(f"{text}: reading .gguf files needs the gguf package: pip install 'llm2emb[gguf]'") from None
        return BaseRef(str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{text}: not a model folder or .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"{text}: folder has no config.json (not a transformers model folder)")
        refuse_damaged(path)
        return BaseRef(str(path.resolve()))
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UserError(f"{text}: no such file or folder")
    return BaseRef(text)


def load_config(base: BaseRef, attention: str):
    """The base's config with attention set as asked; sliding windows and the KV cache off for embedders."""
    if attention not in ATTENTION_MODES:
        raise UserError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    try:
        config = AutoConfig.from_pretrained(base.path, **base.kwargs)
    except Exception as exc:  # a user's file: any failure to read it (a value of the wrong type included) is one line
        raise UserError(f"{base.path}: cannot read the model config ({_first_line(exc)})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{base.path}: model_type {config.model_type!r} is an encoder-decoder, not a decoder")
    if config.model_type not in VERIFIED_MODEL_TYPES:
        logger.warning(
            "model_type %r is not in the verified list %s; trying it, the attention check decides",
            config.model_type,
            VERIFIED_MODEL_TYPES,
        )
    config.is_causal = attention == "causal"
    # Mistral's eager/sdpa and flash paths disagree on the window edge (docs/ARCHITECTURE.md, "Verified facts");
    # embedders see the whole text.
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    # An embedder never decodes: without this every forward fills a KV cache, copying each layer's keys and values
    # (torch.cat) and keeping all of them alive to the end of the forward (sentence-transformers turns it off too).
    config.use_cache = False
    return config


QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(quantization: str, dtype: torch.dtype | str | None):
    """bitsandbytes' config for a 4-bit (NF4, double quantization, QLoRA's choice) or 8-bit base."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if not torch.cuda.is_available():
        raise UserError(f"quantization {quantization} (bitsandbytes) needs a CUDA GPU; none is visible")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("quantization: install bitsandbytes (pip install 'llm2emb[gpu]')") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        compute = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.bfloat16)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(
    base: BaseRef,
    attention: str = "bidirectional",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    quantization: str | None = None,
) -> PreTrainedModel:
    """The headless decoder (`AutoModel`) with the attention mode applied, on `device`, in eval mode; `quantization`
    (4bit | 8bit) loads its linear layers through bitsandbytes for QLoRA."""
    config = load_config(base, attention)
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    model = load_pretrained(AutoModel, base, config=config, dtype=dtype or "auto", **kwargs)
    if device is not None and quantization is None:  # bitsandbytes places quantized weights itself
        model.to(device)
    return model.eval()


def load_pretrained(model_class, base: BaseRef, **kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained` of `base` (GGUF weights dequantized), refusing damaged files and missing weights
    (llm2emb.model.weights); `kwargs` win over the base's own (a quantization config replaces GGUF's)."""
    options = {**base.model_kwargs, **kwargs}
    options.pop("gguf_file", None)
    return load_checked(model_class, base.path, base.gguf_file, **options)


def load_tokenizer(source: BaseRef, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The base's tokenizer with a pad token (EOS, else UNK) so batches can be padded."""
    folder = Path(source.path)
    if folder.is_dir() and not source.gguf_file and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer file (one of {', '.join(TOKENIZER_FILES)}); copy the base's "
                        "tokenizer files into it, or convert it again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
        # a probe as encode calls it: a tokenizer_config value of the wrong type fails here, not mid-corpus
        tokenizer(["a probe"], add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                  verbose=False)
    except Exception as exc:  # a user's tokenizer files, damaged in any way: one line
        raise UserError(f"{source.path}: cannot load the tokenizer ({_first_line(exc)})") from None
    refuse_promoted_tokens(tokenizer, folder)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"{source.path}: tokenizer has neither a pad, EOS nor UNK token to pad with")
        tokenizer.pad_token = fallback
    if tokenizer.eos_token is None:
        raise UserError(f"{source.path}: tokenizer has no EOS token (needed for last-token pooling)")
    tokenizer.padding_side = padding_side
    return tokenizer


def refuse_promoted_tokens(tokenizer, folder: Path) -> None:
    """A UserError when tokenizer_config.json names a special token (bos_token: "a") that tokenizer.json does not hold
    as an added token: transformers promotes it, and every text that contains it then tokenizes differently (a special
    token is split out and never pooled), silently another model."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    try:
        held = {token["content"] for token in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])}
    except (ValueError, TypeError, KeyError, AttributeError):  # a damaged file: AutoTokenizer refused it already
        return
    promoted = sorted({t.content for t in tokenizer.added_tokens_decoder.values()} - held)
    if promoted:
        raise UserError(f"{folder / 'tokenizer_config.json'}: names {', '.join(map(repr, promoted))} as a special token, "
                        f"which {path} does not hold as one; the two files do not belong together")


def check_vocabulary(backbone: torch.nn.Module, tokenizer, where: str) -> None:
    """A UserError when the tokenizer has ids the weights cannot embed: another model's tokenizer files, or added
    tokens the weights never got rows for (a tokenizer_config token tokenizer.json lacks is refused earlier, at load:
    refuse_promoted_tokens)."""
    rows = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        extra = [tokenizer.convert_ids_to_tokens(i) for i in range(rows, min(len(tokenizer), rows + 3))]
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens and the weights embed {rows} (beyond "
                        f"them: {', '.join(map(repr, extra))}); its tokenizer files do not belong to these weights")


@torch.no_grad()
def verify_attention(model: torch.nn.Module, attention: str, vocab_size: int | None = None,
                     causal_sink: bool = False) -> None:
    """Refuse a backbone whose attention is not what was asked, or whose padding leaks into real tokens.

    Two cheap forwards of 8 tokens: changing the last token must change the first position's hidden
    state when bidirectional (the second's with the causal sink, which must leave the first unchanged) and must
    not when causal; changing what sits under padding must change nothing. Runs on every load, on the model's own
    device and dtype.
    """
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    # Ordinary tokens from the upper vocabulary: reserved special tokens often share one embedding.
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab // 4, vocab, (1, 9), generator=generator).to(device)
    ids, replacement = ids[:, :8], ids[0, 8]
    changed = ids.clone()
    changed[0, -1] = replacement if replacement != ids[0, -1] else (replacement + 1) % vocab
    mask = torch.ones_like(ids)
    first = model(input_ids=torch.cat([ids, changed]), attention_mask=torch.cat([mask, mask])).last_hidden_state
    first = first.float()
    def moved_at(position: int) -> float:
        scale = first[0, position].abs().max().clamp_min(1e-6)
        return ((first[0, position] - first[1, position]).abs().max() / scale).item()

    moved = moved_at(1 if causal_sink else 0)
    name = model.config.model_type
    own = ((first[0, -1] - first[1, -1]).abs().max() / first[0, -1].abs().max().clamp_min(1e-6)).item()
    if own < 1e-5:  # not even the changed token's own position moved: the output ignores the input
        raise VerificationError(
            f"model_type {name!r}: the hidden states do not depend on the input tokens (changing a token moved no "
            "position, not even its own): the weights are degenerate, as after a collapsed training run"
        )
    if attention == "bidirectional" and moved < 1e-5:
        if name in VERIFIED_MODEL_TYPES:  # the flag is known to work for these: near-constant weights are likelier
            raise VerificationError(
                f"model_type {name!r}: the first position ignored a change to a later token (relative {moved:.1e}) "
                "although the type honours is_causal=False: the weights are likely degenerate, as after a collapsed "
                "training run (or this transformers version ignores the flag)"
            )
        raise VerificationError(
            f"model_type {name!r} stayed causal with is_causal=False (its attention ignores the flag); "
            f"use attention: causal, or a verified type {VERIFIED_MODEL_TYPES}"
        )
    if causal_sink and moved_at(0) > 1e-3:
        raise VerificationError(f"model_type {name!r}: the first token sees later ones although the causal sink is on "
                                "(an attention path that bypasses llm2emb.model.attention)")
    if attention == "causal" and moved > 1e-3:
        raise VerificationError(f"model_type {name!r} leaks future tokens although attention is causal")

    padded = torch.cat([ids, ids], dim=1)
    other = padded.clone()
    other[0, 8:] = other[0, 8:].flip(0)
    pad_mask = torch.cat([mask, torch.zeros_like(mask)], dim=1)
    out = model(input_ids=torch.cat([padded, other]), attention_mask=torch.cat([pad_mask, pad_mask]))
    out = out.last_hidden_state.float()[:, :8]
    leak = ((out[0] - out[1]).abs().max() / out[0].abs().max().clamp_min(1e-6)).item()
    if leak > 1e-3:
        raise VerificationError(
            f"model_type {name!r} leaks padding into real tokens (relative change {leak:.2e}); "
            "its attention mask is ignored in this attention implementation"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def is_peft(module: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def base_model(backbone: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the backbone itself)."""
    return backbone.get_base_model() if is_peft(backbone) else backbone


def decoder_of(backbone: torch.nn.Module) -> torch.nn.Module:
    """The module holding the transformer layer list (`AutoModel` is the decoder itself for these families)."""
    model = base_model(backbone)
    if not isinstance(getattr(model, "layers", None), torch.nn.ModuleList):
        raise UserError(f"model_type {model.config.model_type!r} has no `layers` list; layers= is unsupported")
    return model
