"""`learning_rate: auto`: LoRA and full fine-tuning get their own measured rates, wider bases a smaller one, and a
run says and records the rate it trained at."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from llm2emb.commands.convert import convert
from llm2emb.train.learning_rate import (
    FULL_FINE_TUNING_RATE,
    LORA_RATE,
    REFERENCE_WIDTH,
    default_learning_rate,
)
from llm2emb.train.recipe_file import load_recipe
from llm2emb.train.runner import train


def test_lora_gets_its_own_rate_and_a_wider_base_a_proportionally_smaller_one():
    assert default_learning_rate(adapter=False, hidden_size=REFERENCE_WIDTH) == FULL_FINE_TUNING_RATE
    assert default_learning_rate(adapter=True, hidden_size=REFERENCE_WIDTH) == LORA_RATE
    assert LORA_RATE > FULL_FINE_TUNING_RATE
    # Qwen2.5-7B's width: 576 / 3584 of the measured rate
    assert default_learning_rate(adapter=True, hidden_size=3584) == pytest.approx(LORA_RATE * 576 / 3584)
    # never scaled up: a narrower base keeps the measured rate
    assert default_learning_rate(adapter=False, hidden_size=64) == FULL_FINE_TUNING_RATE


def write_recipe(folder: Path, base: Path, lora: str, learning_rate: str = "") -> Path:
    rows = [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far from it."}
            for s in ("man", "cat", "dog", "chef") for p in ("street", "mat")]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{base: {base}, max_length: 32}}
        lora: {lora}
        output_dir: {folder / "run"}
        report_to: []
        stages: [{{name: s, max_steps: 2, batch_size: 4, hard_negatives: 1, datasets: [{{path: rows.jsonl}}]
                   {learning_rate}}}]
        """))
    return recipe


@pytest.mark.parametrize(("lora", "rate", "says"), [("null", FULL_FINE_TUNING_RATE, "full fine-tuning"),
                                                    ("{r: 4, alpha: 8}", LORA_RATE, "a LoRA adapter")])
def test_an_auto_rate_follows_the_adapter_choice_and_is_printed_and_recorded(tiny_qwen2, tmp_path, capsys, lora,
                                                                             rate, says):
    base = tmp_path / "emb"
    convert(str(tiny_qwen2), base, pooling="mean")
    recipe = write_recipe(tmp_path, base, lora)
    assert load_recipe(recipe).stages[0].learning_rate == "auto"
    summary = train(recipe)
    assert summary.stages[0]["learning_rate"] == pytest.approx(rate)
    assert f"stages[0].learning_rate: auto -> {rate:.3g} ({says}, hidden size" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert recorded["stages"][0]["learning_rate"] == pytest.approx(rate)


def test_a_given_rate_is_used_as_it_is(tiny_qwen2, tmp_path, capsys):
    base = tmp_path / "emb"
    convert(str(tiny_qwen2), base, pooling="mean")
    summary = train(write_recipe(tmp_path, base, "{r: 4, alpha: 8}", ", learning_rate: 1.0e-3"))
    assert summary.stages[0]["learning_rate"] == pytest.approx(1e-3)
    assert "learning_rate: auto" not in capsys.readouterr().err
