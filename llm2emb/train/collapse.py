"""The collapse guard: stop a contrastive run whose embeddings have become one vector, instead of saving it.

A bidirectional decoder trained at a learning rate near its edge can fall into a state it never leaves: every text
maps to nearly the same vector, each query's softmax over its candidates is uniform, and the loss sits at
ln(candidates) (issue 29: loss 4.10 at step 50 = ln 64, cosine 0.99 between unrelated sentences, STS-B 6.9; the
run exited 0). The NaN guard does not see it, since every number stays finite.

A step counts as collapsed when both hold: the mean cosine between the batch's different texts is at least
`cosine`, and the loss is at least `loss_ratio` x the chance loss (the loss when every candidate scores the same).
Either alone happens in healthy runs: an untrained model's loss starts near or above chance (a healthy SmolLM2 run
passed 4.05 against ln 64 = 4.16 at step 10, then fell to 1.46 by step 20), and a causal base's texts already share a
mean cosine of 0.84. Where the loss has no chance level (graded pairs, distillation) the cosine alone decides, at
`cosine_alone`. The run stops after `patience` collapsed steps in a row, none counted during warmup; the streak
restarts when a run resumes.

A stage can also learn nothing without collapsing: at 20 steps of 16 at learning rate 4e-4, SmolLM2's bidirectional
loss fell from 6.58 only to 4.06, above chance (ln 32 = 3.47), at a cosine of 0.62, and scored 14 on STS-B dev, as
untrained. So at the end of a stage, a mean loss over its last `patience` steps at or above the chance loss stops
it too, before its model is saved; a stage with fewer than `patience` steps after warmup is too short to judge.

And a stage can make the model worse without either: with the causal sink (llm2emb.model.attention) a tiny model at
learning rate 10 went from loss 0.52 to about 2.3 (chance ln 16 = 2.77) at a cosine of 0.85-0.97, never long enough at
both edges to count as collapsed. So a stage whose last `patience` steps averaged at least `regression` x the loss of
its first step (the model as it came in, before any update), and at least half the chance loss (a flat run at a low
loss passes, however noisy its batches), stops the same way.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from llm2emb.train.errors import TrainingStopped


@dataclass
class BatchSpread:
    """One step's view of the embeddings: its loss, the loss at chance (None where undefined) and the mean cosine
    between the batch's different texts."""

    loss: float
    chance: float | None
    cosine: float


class CollapseError(TrainingStopped):
    """The embeddings collapsed; raised before the optimizer step, so every checkpoint on disk predates it."""

    def __init__(self, message: str, step: int, spread: BatchSpread):
        super().__init__(message)
        self.step, self.spread = step, spread


class CollapseGuard:
    """Watches each step's `BatchSpread` and raises `CollapseError` after `patience` collapsed steps in a row."""

    def __init__(self, patience: int = 10, cosine: float = 0.95, loss_ratio: float = 0.9,
                 cosine_alone: float = 0.99, after_step: int = 0, regression: float = 1.5):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience, self.cosine, self.loss_ratio = patience, cosine, loss_ratio
        self.cosine_alone, self.after_step, self.regression = cosine_alone, after_step, regression
        self.opening: float | None = None
        """The first observed step's loss: the model as the stage (or its resumed part) got it."""
        self.streak = self.longest_streak = 0
        self.streak_start: int | None = None
        self.highest_cosine: float | None = None
        self.last: BatchSpread | None = None
        self.recent: deque[BatchSpread] = deque(maxlen=patience)

    def collapsed(self, spread: BatchSpread) -> bool:
        if not math.isfinite(spread.cosine):
            return False
        if spread.chance is None:
            return spread.cosine >= self.cosine_alone
        return spread.cosine >= self.cosine and spread.loss >= self.loss_ratio * spread.chance

    def observe(self, step: int, spread: BatchSpread) -> None:
        """Record step `step` (1-based, the optimizer step about to be taken); raise once the streak is full."""
        self.last = spread
        if self.opening is None:
            self.opening = spread.loss
        if step <= self.after_step:
            return
        self.recent.append(spread)
        if math.isfinite(spread.cosine):
            self.highest_cosine = max(spread.cosine, self.highest_cosine or -1.0)
        if not self.collapsed(spread):
            self.streak, self.streak_start = 0, None
            return
        self.streak += 1
        self.streak_start = self.streak_start or step
        self.longest_streak = max(self.longest_streak, self.streak)
        if self.streak >= self.patience:
            raise CollapseError(self.message(step, spread), step, spread)

    def message(self, step: int, spread: BatchSpread) -> str:
        if spread.chance is None:
            signal = f"loss {spread.loss:.2f}, mean cosine {spread.cosine:.3f} between different texts"
        else:
            candidates = round(math.exp(spread.chance))
            signal = (f"loss {spread.loss:.2f} against {spread.chance:.2f} = ln {candidates} candidates at chance, "
                      f"mean cosine {spread.cosine:.3f} between different texts")
        return (f"step {step}: the embeddings collapsed ({signal}, steps {self.streak_start}-{step}); "
                "stopped before the optimizer step")

    def check_learned(self, step: int) -> None:
        """At the end of a stage: raise when its last `patience` steps after warmup averaged a loss at or above
        chance (it learned nothing), or well above its opening loss (it made the model worse); a stage with fewer
        such steps, or a loss without a chance level, passes."""
        if len(self.recent) < self.patience or any(s.chance is None for s in self.recent):
            return
        loss = sum(s.loss for s in self.recent) / len(self.recent)
        chance = sum(s.chance for s in self.recent) / len(self.recent)
        cosine = sum(s.cosine for s in self.recent) / len(self.recent)
        ending = f"mean loss {loss:.2f} over its last {len(self.recent)} steps"
        spread = f"mean cosine {cosine:.3f} between different texts"
        if loss >= chance:
            raise CollapseError(
                f"step {step}: the stage ended without learning ({ending}, at or above {chance:.2f} = "
                f"ln {round(math.exp(chance))} candidates at chance; {spread}); its model was not saved",
                step, BatchSpread(loss, chance, cosine))
        if loss >= self.regression * self.opening and loss >= chance / 2:
            raise CollapseError(
                f"step {step}: the stage ended worse than it began ({ending} against {self.opening:.2f} at its "
                f"first, chance {chance:.2f}; {spread}); its model was not saved",
                step, BatchSpread(loss, chance, cosine))

    def report(self) -> dict:
        """What summary.json keeps of the stage: how close it came (the longest streak against the patience)."""
        return {
            "embedding_cosine": None if self.last is None else round(self.last.cosine, 4),
            "highest_embedding_cosine_after_warmup": None if self.highest_cosine is None
            else round(self.highest_cosine, 4),
            "longest_collapse_streak": self.longest_streak,
            "collapse_patience": self.patience,
        }


def replay(records: list[dict], guard: CollapseGuard) -> str | None:
    """What `guard` would have said of a finished run: its stop message, or None. `records` are a stage's loss lines
    of metrics.jsonl logged every step (logging_steps: 1), each with `loss`, `chance_loss` and `embedding_cosine`;
    the benchmark scripts run with the guard off and judge every run this way, so a run's score and the guard's
    verdict can be compared."""
    step = 0
    try:
        for record in records:
            step = record["step"]
            guard.observe(step, BatchSpread(record["loss"], record.get("chance_loss"), record["embedding_cosine"]))
        guard.check_learned(step)
    except CollapseError as exc:
        return str(exc)
    return None
