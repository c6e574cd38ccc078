"""The collapse guard both ways: it stops a forced collapse (and a stage that learned nothing) with one line and no
model, and leaves healthy runs alone, real ones included; `encode` and `eval` warn about degenerate vectors."""

from __future__ import annotations

import json
import math
import random
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb.cli import main
from llm2emb.commands.convert import convert
from llm2emb.model.spread import degenerate_warning, mean_cosine
from llm2emb.train.collapse import BatchSpread, CollapseError, CollapseGuard, replay
from llm2emb.train.runner import train

CHANCE_64 = math.log(64)
WORDS = ["alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "mike", "oscar", "papa", "romeo", "sierra",
         "tango", "victor", "whiskey", "zulu"]


# ---- the measure and the rule --------------------------------------------------------------------------------


def test_mean_cosine_skips_pairs_of_the_same_text():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_cosine(vectors).item() == pytest.approx(1 / 3)  # pairs: (0,1)=1, (0,2)=0, (1,2)=0
    assert mean_cosine(vectors, torch.tensor([7, 7, 8])).item() == pytest.approx(0.0)
    assert math.isnan(mean_cosine(vectors[:1]).item())


def test_guard_stops_after_patience_collapsed_steps_counted_after_warmup_only():
    guard = CollapseGuard(patience=3, after_step=2)
    collapsed = BatchSpread(loss=4.15, chance=CHANCE_64, cosine=0.99)
    for step in (1, 2):  # warmup: not counted
        guard.observe(step, collapsed)
    guard.observe(3, collapsed)
    guard.observe(4, collapsed)
    guard.observe(5, BatchSpread(loss=2.0, chance=CHANCE_64, cosine=0.99))  # the loss learned: streak over
    guard.observe(6, collapsed)
    guard.observe(7, collapsed)
    with pytest.raises(CollapseError) as caught:
        guard.observe(8, collapsed)
    assert str(caught.value) == ("step 8: the embeddings collapsed (loss 4.15 against 4.16 = ln 64 candidates at "
                                 "chance, mean cosine 0.990 between different texts, steps 6-8); stopped before the "
                                 "optimizer step")
    assert caught.value.step == 8 and guard.longest_streak == 3


def test_either_signal_alone_is_no_collapse_but_cosine_decides_without_a_chance_level():
    guard = CollapseGuard(patience=2)
    for step in range(1, 6):
        guard.observe(step, BatchSpread(loss=4.2, chance=CHANCE_64, cosine=0.80))  # at chance, vectors apart
    for step in range(6, 11):
        guard.observe(step, BatchSpread(loss=1.0, chance=CHANCE_64, cosine=0.99))  # alike, but still ranking
    guard.observe(11, BatchSpread(loss=0.4, chance=None, cosine=0.98))  # a graded loss: 0.99 needed alone
    assert guard.longest_streak == 0
    guard.observe(12, BatchSpread(loss=0.4, chance=None, cosine=0.995))
    with pytest.raises(CollapseError, match=r"loss 0.40, mean cosine 0.995 between different texts, steps 12-13"):
        guard.observe(13, BatchSpread(loss=0.4, chance=None, cosine=0.995))


def test_a_stage_that_ends_at_chance_learned_nothing_unless_too_short_to_judge():
    guard = CollapseGuard(patience=4)
    for step in range(1, 4):
        guard.observe(step, BatchSpread(loss=4.3, chance=CHANCE_64, cosine=0.6))
    guard.check_learned(3)  # three steps: too short to judge
    guard.observe(4, BatchSpread(loss=4.0, chance=CHANCE_64, cosine=0.6))
    with pytest.raises(CollapseError, match=r"step 4: the stage ended without learning \(mean loss 4.22 over its "
                                            r"last 4 steps, at or above 4.16 = ln 64"):
        guard.check_learned(4)
    guard.observe(5, BatchSpread(loss=1.0, chance=CHANCE_64, cosine=0.6))
    guard.check_learned(5)  # mean of the last four: 3.4 < 4.16


def test_a_stage_that_ends_well_above_its_first_loss_made_the_model_worse_unless_low_against_chance():
    def run(opening: float, later: list[float]) -> CollapseGuard:
        guard = CollapseGuard(patience=4)
        for step, loss in enumerate([opening, *later], start=1):
            guard.observe(step, BatchSpread(loss=loss, chance=CHANCE_64, cosine=0.8))
        return guard

    with pytest.raises(CollapseError, match=r"step 5: the stage ended worse than it began \(mean loss 2.50 over its "
                                            r"last 4 steps against 1.00 at its first, chance 4.16"):
        run(1.0, [2.4, 2.6, 2.5, 2.5]).check_learned(5)
    run(1.0, [1.4, 1.5, 1.3, 1.6]).check_learned(5)  # below 1.5x its start
    run(0.2, [0.9, 1.1, 1.0, 1.0]).check_learned(5)  # 5x its start, but far under chance: noisy batches, no harm
    run(3.0, [2.4, 2.6, 2.5, 2.5]).check_learned(5)  # below where it began


# ---- real curves -------------------------------------------------------------------------------------------------

CURVES = Path(__file__).parent / "data" / "spread_curves.jsonl"


def real_curves() -> list[dict]:
    return [json.loads(line) for line in CURVES.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("curve", real_curves(), ids=lambda c: c["name"])
def test_real_smollm2_curves(curve):
    """Per-step loss, chance loss and spread of real SmolLM2-135M runs, trained with the guard off and scored on
    STS-B dev (benchmarks/RESULTS.md, "Robust defaults"), replayed through the default guard: the ones that learned
    pass, the ones that collapsed or learned nothing stop."""
    verdict = replay(curve["steps"], CollapseGuard(after_step=curve["warmup_steps"]))
    if curve["healthy"]:
        assert verdict is None, f"{curve['name']} (STS-B dev {curve['stsb_dev']}) was stopped: {verdict}"
    else:
        assert verdict is not None, f"{curve['name']} (STS-B dev {curve['stsb_dev']}) was not stopped"


# ---- tiny models, end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("collapse") / "emb"
    # Plainly bidirectional: with the causal sink, lr 10 leaves vectors that still tell the texts apart (loss
    # below chance), so the forced collapse below would not be one.
    convert(str(tiny_qwen2), out, pooling="mean", dtype="float32", causal_sink=False)
    return out


def write_run(folder: Path, base: Path, rows: list[dict], **stage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {"name": "s", "max_steps": 30, "batch_size": 8, "temperature": 0.05, "hard_negatives": 1,
            "datasets": [{"path": "rows.jsonl"}], **stage}
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{base: {base}, max_length: 32}}
        lora: null
        output_dir: {folder / "run"}
        logging_steps: 1
        save_steps: 5
        report_to: []
        stages: [{json.dumps(keys)}]
        """))
    return recipe


def sentence_rows() -> list[dict]:
    subjects = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital"]
    places = ["street", "kitchen", "mat", "garden"]
    return [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far from the {p}."}
            for s in subjects for p in places]


def word_rows() -> list[dict]:
    """Queries and positives with no word in common: a tiny model starts near (here above) chance on them."""
    pick = random.Random(0).sample
    return [{"query": " ".join(pick(WORDS, 3)), "positive": " ".join(pick(WORDS, 3)),
             "negative": " ".join(pick(WORDS, 3))} for _ in range(32)]


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_forced_collapse_stops_in_one_line_keeps_checkpoints_and_writes_no_model(base, tmp_path, capsys):
    # lr 10 pins the loss near chance with every vector alike, but the exact curve moves with the machine's numerics
    # (a step a little under 0.9 x chance breaks a streak): a streak of 3 stops it wherever it runs
    recipe = write_run(tmp_path, base, sentence_rows(), learning_rate=10.0, lr_scheduler="constant", warmup_steps=0,
                       collapse_guard={"patience": 3})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    stopped = re.match(r"llm2emb train: error: stages\[0\] \(s\) step (\d+): the embeddings collapsed \(loss 2\.\d\d against "
                       r"2\.77 = ln 16 candidates at chance, mean cosine 0\.9\d", err)
    assert stopped, err
    assert "lower learning_rate (10) or lengthen warmup_steps (0)" in err
    assert err.endswith(f"nothing was written to {tmp_path / 'run' / 'model'}")
    run = tmp_path / "run"
    assert not (run / "model").exists() and not (run / "stages" / "0-s" / "final").exists()
    kept = [int(p.name.split("-")[1]) for p in (run / "stages" / "0-s").glob("checkpoint-*")]
    assert kept and all(step % 5 == 0 and step < int(stopped.group(1)) for step in kept)  # only steps before the stop
    event = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"collapse"' in line)
    assert event["embedding_cosine"] >= 0.95 and event["message"] == err.removeprefix("llm2emb train: error: ")
    assert all("embedding_cosine" in r and r["chance_loss"] == pytest.approx(math.log(16), abs=1e-3)
               for r in losses(run))

    # the collapsed checkpoint's vectors: encode and eval warn in one line each
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"{r['positive']}\n" for r in sentence_rows()))
    # the same run unguarded, a checkpoint every step: the first degenerate one that still loads gets a warning, the
    # last (ten steps at 10, the output no longer depends on the input) is refused; where the curve crosses moves
    # with the machine's numerics, so both are looked for
    unguarded = write_run(tmp_path / "unguarded", base, sentence_rows(), learning_rate=10.0, lr_scheduler="constant",
                          warmup_steps=0, max_steps=10, collapse_guard=None)
    unguarded.write_text(unguarded.read_text().replace("save_steps: 5", "save_steps: 1\nsave_total_limit: 20"))
    assert main(["train", str(unguarded)]) == 0
    capsys.readouterr()
    warned, refused, loadable = None, None, []
    for step in range(1, 11):
        checkpoint = tmp_path / "unguarded" / "run" / "stages" / "0-s" / f"checkpoint-{step}"
        code = main(["encode", str(checkpoint), "--input", str(texts), "--output", str(tmp_path / "e.npy"), "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        if code == 0 and any("the vectors are degenerate" in line for line in lines):
            warned = warned or lines
            loadable.append(checkpoint)
        if code == 2:
            refused = lines
    assert refused is not None and len(refused) == 1 and refused[0].startswith("llm2emb encode: error: ")
    assert "degenerate" in refused[0], refused  # the weights, not the model type, are named
    assert warned is not None, "no checkpoint was degenerate and still loadable"
    warning = [line for line in warned if "the vectors are degenerate" in line]
    assert len(warning) == 1 and "the vectors are degenerate: mean cosine 0.9" in warning[0], warned
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 5}\t{r['positive']}\t{r['negative']}\n"
                                                           for i, r in enumerate(sentence_rows())))
    warnings = []
    for checkpoint in loadable:
        assert main(["eval", str(checkpoint), "--sts", str(sts)]) == 0
        warnings += [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert warnings and all("/sts sentences: the vectors are degenerate: mean cosine 0.9" in w for w in warnings)


def test_with_the_causal_sink_a_forced_learning_rate_stops_as_a_stage_that_made_the_model_worse(tiny_qwen2, tmp_path,
                                                                                                capsys):
    """The sink keeps texts apart even in a wrecked model (loss about 2.3 against ln 16 = 2.77, cosine 0.85-0.97), so
    lr 10 is no collapse; it is a stage that ended far above its first loss (0.52), and it stops as one. The sink on
    the text's own first word (no lead token): with `bos` the sink is a token every text shares, and lr 10 collapses
    as in the test above."""
    sink = tmp_path / "sink"
    convert(str(tiny_qwen2), sink, pooling="mean", dtype="float32", text_template="none")
    recipe = write_run(tmp_path, sink, sentence_rows(), learning_rate=10.0, lr_scheduler="constant", warmup_steps=0)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llm2emb train: error: stages[0] (s) step 30: the stage ended worse than it began")
    assert "lower learning_rate (10)" in err and err.endswith(f"nothing was written to {tmp_path / 'run' / 'model'}")
    assert not (tmp_path / "run" / "model").exists()


def test_a_healthy_tiny_run_is_left_alone_and_reports_its_spread(base, tmp_path, capsys):
    recipe = write_run(tmp_path, base, sentence_rows(), learning_rate=5e-3)
    summary = train(recipe)
    stage = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"][0]
    assert summary.steps == 30 and stage["longest_collapse_streak"] == 0 and stage["collapse_patience"] == 10
    assert stage["highest_embedding_cosine_after_warmup"] < 0.95
    assert (tmp_path / "run" / "model" / "llm2emb.json").is_file()
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"{r['positive']}\n" for r in sentence_rows()))
    assert main(["encode", str(tmp_path / "run" / "model"), "--input", str(texts), "--output", str(tmp_path / "e.npy"),
                 "--quiet"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_a_tiny_run_that_starts_above_chance_and_passes_the_edge_is_not_stopped(base, tmp_path):
    """Words with nothing in common: the loss starts above ln 16, and the batch's vectors draw together (cosine up
    to 0.98, loss at chance) for a few steps before they part again and the loss falls. The default patience leaves it
    alone; a guard of patience 2 on the same run stops it, so the run does come near."""
    recipe = write_run(tmp_path / "default", base, word_rows(), max_steps=40, learning_rate=1e-3)
    train(recipe)
    curve = losses(tmp_path / "default" / "run")
    assert curve[0]["loss"] > math.log(16) and curve[-1]["loss"] < 0.7 * math.log(16)
    stage = json.loads((tmp_path / "default" / "run" / "summary.json").read_text())["stages"][0]
    assert 2 <= stage["longest_collapse_streak"] < 10
    strict = write_run(tmp_path / "strict", base, word_rows(), max_steps=40, learning_rate=1e-3,
                       collapse_guard={"patience": 2})
    with pytest.raises(CollapseError, match=r"stages\[0\] \(s\) step \d+: the embeddings collapsed"):
        train(strict)


def test_degenerate_warning_needs_nearly_one_vector():
    rng = np.random.default_rng(0)
    spread_out = rng.normal(size=(100, 16)).astype(np.float32)
    assert degenerate_warning(spread_out, "x") is None
    alike = np.ones((100, 16), np.float32) + 0.01 * spread_out
    assert degenerate_warning(alike, "emb.npy").startswith("WARNING: emb.npy: the vectors are degenerate: mean cosine")
    assert degenerate_warning(alike[:1], "one row") is None
