"""`learning_rate: auto`, a stage's default rate: one for full fine-tuning and one for a LoRA adapter, measured on
SmolLM2-135M, and scaled down for wider bases.

Why two rates: LoRA's update is a low-rank product whose scale starts small, so it wants several times the rate of
full fine-tuning; one rate for both left every LoRA run (`lora: auto`'s choice, then for bases of 1B parameters or
more, now for every base) at a rate never tuned for it (benchmarks/RESULTS.md, "LoRA at 20 x 16": STS-B dev 74.0 / 74.5 at 4e-4 against
78.5 / 79.7 at 2e-3 on the same two row orders).

Why the width: under Adam a weight's update is about `rate` per entry whatever the gradient's size, so a layer's output
moves in proportion to rate x width; keeping that product fixed is the rule of maximal-update parametrisation
(Yang et al., 2022) and of the usual practice (7B embedders train at 1e-4 to 3e-4 with LoRA). It is applied only
downward: a base narrower than SmolLM2 keeps the measured rates. Measured at one width only (576); the rates it gives
other bases are a rule, not a measurement.
"""

from __future__ import annotations

FULL_FINE_TUNING_RATE = 4e-4
"""SmolLM2-135M, every weight (benchmarks/RESULTS.md, "Matched budget" and "Robust defaults")."""

LORA_RATE = 2e-3
"""SmolLM2-135M, LoRA r 16 / alpha 32 on every linear layer (benchmarks/RESULTS.md, "LoRA at 20 x 16", and at
51 x 32 with the bos text template, "The defaults at 51 x 32")."""

REFERENCE_WIDTH = 576
"""SmolLM2-135M's hidden size, where both rates were measured."""


def default_learning_rate(adapter: bool, hidden_size: int) -> float:
    """The rate `learning_rate: auto` resolves to for a base of this hidden size, training an adapter or not."""
    rate = LORA_RATE if adapter else FULL_FINE_TUNING_RATE
    return rate * min(1.0, REFERENCE_WIDTH / hidden_size)
