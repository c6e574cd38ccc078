"""Long context without retraining (LongEmbed): RoPE frequencies stretched for texts beyond the trained window.

Three ways to stretch the window `L` of a RoPE decoder by `factor` s:
  pi    position interpolation: every frequency divided by s (positions 0..sL land on 0..L).
  ntk   NTK-aware scaling: the base theta becomes theta * s^(d/(d-2)); the highest frequency is kept, the lowest is
        divided by s, those between by s^(2i/(d-2)).
  yarn  YaRN's "NTK-by-parts" frequencies: dimensions that turn many times within L keep their frequency, those that
        turn less than once are divided by s, with a linear ramp between (beta_fast 32, beta_slow 1, as transformers).
        YaRN's attention temperature is left out: it would change texts inside the window as well.

Each is written into the backbone's `config.json` as transformers' `longrope` RoPE type: `short_factor` all ones
(the trained frequencies) and `long_factor` the method's per-dimension divisors, with `original_max_position_embeddings`
= L and `attention_factor` 1. transformers picks the long set only when a forward's positions go beyond L, so a text
that fits the window embeds exactly as before and any tool that loads the folder through transformers applies the
same extension. The choice is per forward (its longest position): `Embedder.encode` never batches texts from both
sides of the window together, so each text's vector does not depend on its batch.
"""

from __future__ import annotations

import math
from typing import Any

from llm2emb.errors import UserError

METHODS = ("pi", "ntk", "yarn")


def parse_rope_scaling(spec: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """`yarn:4` or {"method": "yarn", "factor": 4} -> {"method": "yarn", "factor": 4.0}; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        method, _, factor = spec.partition(":")
        spec = {"method": method, "factor": factor}
    method, factor = spec.get("method"), spec.get("factor")
    if method not in METHODS:
        raise UserError(f"rope scaling {method!r}: expected one of {', '.join(METHODS)} (e.g. yarn:4)")
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise UserError(f"rope scaling {method}: factor {factor!r} is not a number (e.g. {method}:4)") from None
    if not factor > 1:
        raise UserError(f"rope scaling {method}: factor must be above 1 (the window grows factor times), got {factor}")
    return {"method": method, "factor": factor}


def long_factors(method: str, factor: float, head_dim: int, theta: float, window: int) -> list[float]:
    """The divisor of each of the head_dim / 2 RoPE frequencies beyond the window."""
    half = head_dim // 2
    if method == "pi":
        return [factor] * half
    if method == "ntk":
        return [factor ** (2 * i / (head_dim - 2)) for i in range(half)]
    # yarn: a dimension that turns r times over the window keeps its frequency when r >= beta_fast, is divided by
    # the factor when r <= beta_slow, and is blended linearly in between (transformers' yarn with truncate=True)

    def dimension_turning(turns: float) -> float:
        return head_dim * math.log(window / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension_turning(32)), 0)
    high = min(math.ceil(dimension_turning(1)), head_dim - 1)
    high = high + 0.001 if high == low else high
    divisors = []
    for i in range(half):
        interpolated = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep the frequency, 1: divide by factor
        kept = 1.0 - interpolated
        divisors.append(1.0 / (kept + interpolated / factor))
    return divisors


def extend_rope(config, rope_scaling: dict[str, Any]) -> None:
    """Write the extension into a transformers model config (in place): longrope parameters, a longer window."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in parameters:
        raise UserError(f"{config.model_type}: no RoPE parameters in the model config; rope scaling needs a RoPE model")
    if parameters.get("rope_type", "default") != "default":
        raise UserError(f"{config.model_type}: the base already uses RoPE type {parameters['rope_type']!r}; rope "
                        "scaling extends a base with plain RoPE")
    window = config.max_position_embeddings
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": parameters["rope_theta"],
        "short_factor": [1.0] * half,
        "long_factor": long_factors(rope_scaling["method"], rope_scaling["factor"], head_dim,
                                    parameters["rope_theta"], window),
        "original_max_position_embeddings": window,
        "attention_factor": 1.0,
        **({"partial_rotary_factor": parameters["partial_rotary_factor"]}
           if "partial_rotary_factor" in parameters else {}),
    }
    config.max_position_embeddings = int(window * rope_scaling["factor"])


def rope_window(config) -> int | None:
    """The trained window of an extended config (texts longer than it get the stretched frequencies), else None."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type") == "longrope":
        return parameters["original_max_position_embeddings"]
    return None


def rebuild_rotary(decoder) -> None:
    """Give a loaded decoder the rotary embedding of its (extended) config, on the same device."""
    rotary = decoder.rotary_emb
    decoder.rotary_emb = type(rotary)(config=decoder.config).to(rotary.inv_freq.device)
