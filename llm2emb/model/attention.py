"""Attention backends: padded batches, or packed rows attended per text by a varlen kernel.

Packed rows (llm2emb.model.packing) need attention that stays inside each text: transformers' bidirectional
mask ignores packing, so `position_ids` alone leak attention across texts (docs/ARCHITECTURE.md, "Verified
facts"). We register one attention function, `llm2emb_varlen`, through transformers' AttentionInterface (with sdpa's mask
function in the AttentionMaskInterface). When the model call carries `cu_seq_lens_q` it runs a varlen
kernel with `causal` taken from the config (False for embedders); otherwise it is plain sdpa, so a
backbone switched to it behaves exactly as before for padded batches. The choice lives in the call's
keyword arguments, not in a temporarily swapped config, so gradient-checkpoint recomputation replays
the same kernel.

The causal sink (`set_causal_sink`, on by default for bidirectional models): every text's first token attends only
to itself, as it did in the causal base, while every other token attends to the whole text. A causal LM parks its
unneeded attention on the first token (the attention sink); letting that token see later ones rewrites the state every
head leans on, which is why an untrained SmolLM2-135M scored 29.6 on STS-B dev plainly bidirectional, 53.8 causal and
64.9 with the sink kept causal (benchmarks/RESULTS.md, "The causal sink"). A token that attends to itself alone
outputs its own value vector, so the sink is applied after any kernel: the first row of each text is overwritten with
its value (per query head). It needs this module's attention function, which every path here goes through.

Kernels: `flash_attn` (flash-attn's `flash_attn_varlen_func`), `varlen_attn` (torch >= 2.9's
`torch.nn.attention.varlen_attn`), both CUDA with float16/bfloat16; `sdpa` runs anywhere (the CPU
path and the reference): only the attention is re-padded per text, every linear layer sees real tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llm2emb.errors import UserError
from llm2emb.model.packing import segment_ids

IMPLEMENTATION = "llm2emb_varlen"
"""The attention implementation name a backbone is switched to for packed batches."""

BACKENDS = ("auto", "padded", "packed", "flash_attn", "varlen_attn")
"""`attention_backend` values: auto picks the fastest available; packed the best packed kernel here."""

KERNELS = ("flash_attn", "varlen_attn", "sdpa")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _flash_attn(query, key, value, cu_seqlens, max_length, scale, dropout, causal):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        query, key, value, cu_seqlens, cu_seqlens, max_length, max_length,
        dropout_p=dropout, softmax_scale=scale, causal=causal,
    )


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(query, key, value, cu_seqlens, max_length, scale, dropout, causal):
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise UserError("attention backend varlen_attn has no attention dropout; use flash_attn or padded")
    # The keyword set changed between torch releases: 2.13 has enable_gqa and window_size; 2.11 has window_size but
    # no enable_gqa, so key/value heads are repeated to the query heads (found on an H100); older ones take is_causal.
    parameters = _varlen_parameters()
    options = {"scale": scale}
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, **options)


def _sdpa_per_text(query, key, value, cu_seqlens, max_length, scale, dropout, causal):
    """Re-pad q, k, v to (texts, heads, longest, dim) for sdpa with a key mask, then gather real tokens back."""
    text, position = segment_ids(cu_seqlens)
    lengths = cu_seqlens.diff().long()

    def repad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(lengths.numel(), max_length, *x.shape[1:])
        out[text, position] = x
        return out.transpose(1, 2)

    q, k, v = repad(query), repad(key), repad(value)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    slots = torch.arange(max_length, device=query.device)
    # Every text keeps at least one key, so rows of an empty text stay finite (and are never gathered).
    mask = (slots[None, :] < lengths.clamp_min(1)[:, None])[:, None, None, :]
    if causal:
        mask = mask & (slots[:, None] >= slots[None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)[text, position]


_KERNEL_FUNCTIONS = {"flash_attn": _flash_attn, "varlen_attn": _torch_varlen, "sdpa": _sdpa_per_text}


FUTURE_BIAS_FLOOR = -1e4
"""The bias that stands for "no attention" to later tokens: exp(-1e4) is 0 in float32 and bfloat16, and unlike -inf it
keeps a padding query whose keys all lie ahead (left padding) finite."""


def with_future_bias(attention_mask, query, key, bias: float) -> torch.Tensor:
    """sdpa's mask (None, boolean or additive) plus `bias` on every key after the query (the soft-causal curriculum).

    bias = log(w) scales the unnormalised attention to later tokens by w: w = 0 is causal, w = 1 bidirectional.
    """
    rows, columns = query.shape[-2], key.shape[-2]
    later = torch.ones(rows, columns, dtype=torch.bool, device=query.device).triu(1)
    additive = torch.zeros(rows, columns, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(later, max(bias, FUTURE_BIAS_FLOOR))[None, None]
    if attention_mask is None:
        return additive
    if attention_mask.dtype == torch.bool:
        return additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return attention_mask + additive


def first_positions(attention_mask, batch: int, device: torch.device) -> torch.Tensor:
    """Each padded row's first real position (B,), from sdpa's padding mask (None: no padding, so 0); a bidirectional
    padding mask gives every query row of a text the same keys, so the last query row's keys say where it starts."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    keys = attention_mask[:, 0, -1, :]
    valid = keys if keys.dtype == torch.bool else keys > torch.finfo(keys.dtype).min / 2
    return valid.int().argmax(dim=-1).expand(batch)


def with_own_values(out: torch.Tensor, value: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`out` with the rows at `index` replaced by their own value vectors, repeated to the query heads: what a token
    that attends to itself alone computes. out (..., heads, dim), value indexed the same way with (..., kv_heads, dim)."""
    own = value[index]
    own = own.repeat_interleave(out.shape[-2] // own.shape[-2], dim=-2)
    return out.index_put(index, own.to(out.dtype))


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface entry: a varlen kernel for packed calls, sdpa for padded ones (with the curriculum's
    `llm2emb_future_bias` on later tokens when a training step passes one); the causal sink after either."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    sink = getattr(module, SINK_ATTRIBUTE, False)
    if cu_seqlens is None:
        bias = kwargs.pop("llm2emb_future_bias", None)
        first = first_positions(attention_mask, query.shape[0], query.device) if sink else None
        if bias is not None:
            attention_mask = with_future_bias(attention_mask, query, key, bias)
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
        if sink:  # out (B, T, heads, dim); value (B, kv_heads, T, dim)
            rows = torch.arange(query.shape[0], device=query.device)
            out = with_own_values(out, value.transpose(1, 2), (rows, first))
        return out, weights
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    kernel = _KERNEL_FUNCTIONS[kwargs.get("llm2emb_kernel", "sdpa")]
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # transformers hands (1, heads, N, dim); varlen kernels take (N, heads, dim).
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = kernel(q, k, v, cu_seqlens, int(kwargs["max_length_q"]), scaling, dropout, causal)
    if sink:
        starts = cu_seqlens[:-1].long()
        out = with_own_values(out, v, (starts[starts < out.shape[0]],))
    return out.unsqueeze(0), None


AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------- choosing a backend
def kernel_problem(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `kernel` cannot run for weights of `dtype` on `device`, or None when it can."""
    if kernel == "sdpa":
        return None
    if kernel == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "attention backend flash_attn needs the flash-attn package: pip install flash-attn (CUDA only)"
    if kernel == "varlen_attn" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"attention backend varlen_attn needs torch >= 2.9 (this is {torch.__version__})"
    if device.type != "cuda":
        return f"attention backend {kernel} runs on CUDA only (the model is on {device.type})"
    if dtype not in HALF_DTYPES:
        return f"attention backend {kernel} needs float16 or bfloat16 weights (the model is {dtype}); load with torch_dtype=bfloat16"
    return None


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype, implementation: str | None) -> str:
    """`padded`, or the packed kernel to run (one of KERNELS); a one-line UserError when the request cannot run.

    auto: a CUDA varlen kernel when one is usable (flash-attn first); else, on a CPU, the packed sdpa kernel: it
    re-pads inside attention only, so the linear layers skip the padding; it encoded at 0.96x-1.10x the padded
    speed and trained at 1.0x-1.2x with 41% less peak memory (benchmarks/RESULTS.md "Speed", "CPU speed and
    memory"); else (CUDA without a usable varlen kernel, unmeasured) padded.
    packed: flash_attn, else varlen_attn, else the sdpa kernel (any device).
    """
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise UserError(f"attention_backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "padded":
        return "padded"
    if implementation not in ("sdpa", IMPLEMENTATION):
        if requested == "auto":
            return "padded"
        raise UserError(
            f"attention backend {requested} replaces sdpa, but the backbone was loaded with "
            f"attn_implementation={implementation!r}; load it without attn_implementation"
        )
    if requested in ("flash_attn", "varlen_attn"):
        problem = kernel_problem(requested, device, dtype)
        if problem:
            raise UserError(problem)
        return requested
    for kernel in ("flash_attn", "varlen_attn"):
        if kernel_problem(kernel, device, dtype) is None:
            return kernel
    return "sdpa" if requested == "packed" or device.type == "cpu" else "padded"


SINK_ATTRIBUTE = "llm2emb_causal_sink"
"""Set on a backbone's attention modules by `set_causal_sink`; read by `varlen_attention_forward`."""


def set_causal_sink(model, on: bool) -> None:
    """Keep every text's first token causal in `model`'s attention (see the module docstring), or stop keeping it.

    It lives on the attention modules, not in the call, so every caller of the backbone (encode, training, MNTP, the
    load-time attention check) attends the same way; refused for a backbone loaded with another attention
    implementation, whose kernel would ignore it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if on:
        implementation = base.config._attn_implementation
        if implementation not in ("sdpa", IMPLEMENTATION):
            raise UserError(f"the causal sink needs llm2emb's sdpa-based attention, but the backbone was loaded with "
                            f"attn_implementation={implementation!r}; load it without attn_implementation, or convert "
                            "with --no-causal-sink")
        if not layers:
            raise UserError(f"model_type {base.config.model_type!r}: no attention layer found to keep the sink causal in; "
                            "convert with --no-causal-sink")
        use_varlen_attention(model)
    for layer in layers:
        setattr(layer, SINK_ATTRIBUTE, on)


def use_varlen_attention(model) -> None:
    """Switch a transformers model (or the base of a PeftModel) to IMPLEMENTATION; idempotent."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != IMPLEMENTATION:
        base.set_attn_implementation(IMPLEMENTATION)
