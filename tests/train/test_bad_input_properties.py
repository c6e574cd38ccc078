"""Property-based: recipes and data files corrupted at random (truncated, wrong types, broken JSON lines, empty and
huge fields, unicode) get one line and exit code 2 from the CLI, or pass when the corruption left them valid; never a
traceback, and never a written run folder when refused."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm2emb.cli import main
from llm2emb.commands.convert import convert

RECIPE = """\
    model: {base: emb, max_length: 32}
    lora: {r: 4, alpha: 8}
    output_dir: run
    stages:
      - name: only
        max_steps: 2
        batch_size: 4
        learning_rate: 1.0e-3
        hard_negatives: 1
        datasets: [{path: rows.jsonl, instruction: Find the sentence}]
"""
ROWS = [{"query": f"q{i} on the mat?", "positive": f"A cat {i} is on the mat.", "negative": f"A dog {i} runs."}
        for i in range(8)]

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12), st.floats(allow_nan=True),
    st.text(max_size=30), st.just(""), st.just("x" * 100_000), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def base(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("props") / "converted"
    convert(str(tiny_qwen2), out, pooling="mean", dtype="float32")
    return out


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)  # an uncaught exception fails the test: that is the traceback a user would see
    return code, err.getvalue()


def assert_one_line_or_success(code: int, stderr: str, directory: Path) -> None:
    assert "Traceback" not in stderr
    if code == 0:
        return
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("llm2emb train: error: "), stderr
    assert not (directory / "run").exists()


def set_at(node, path: list, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def key_paths(node, prefix=()) -> list[tuple]:
    if isinstance(node, dict):
        return [prefix] + [p for k, v in node.items() for p in key_paths(v, (*prefix, k))]
    if isinstance(node, list):
        return [prefix] + [p for i, v in enumerate(node) for p in key_paths(v, (*prefix, i))]
    return [prefix]


def workspace(directory: Path, base: Path, recipe_text: str, rows_text: str) -> Path:
    (directory / "emb").symlink_to(base)
    (directory / "rows.jsonl").write_text(rows_text, encoding="utf-8")
    recipe = directory / "recipe.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    return recipe


VALID_RECIPE = textwrap.dedent(RECIPE)
VALID_ROWS = "".join(json.dumps(r) + "\n" for r in ROWS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_recipes_get_one_line(base, data):
    mutation = data.draw(st.sampled_from(["truncate", "retype", "drop_line", "unicode_line"]))
    text = VALID_RECIPE
    if mutation == "truncate":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif mutation == "retype":
        tree = yaml.safe_load(text)
        path = data.draw(st.sampled_from([p for p in key_paths(tree) if p]))
        set_at(tree, list(path), data.draw(JUNK))
        text = yaml.safe_dump(tree, allow_unicode=True)
    elif mutation == "drop_line":
        lines = text.splitlines(keepends=True)
        del lines[data.draw(st.integers(0, len(lines) - 1))]
        text = "".join(lines)
    else:
        lines = text.splitlines(keepends=True)
        lines.insert(data.draw(st.integers(0, len(lines))), data.draw(st.text(min_size=1, max_size=40)) + "\n")
        text = "".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = workspace(Path(tmp), base, text, VALID_ROWS)
        assert_one_line_or_success(*run_cli(["train", str(recipe), "--check"]), Path(tmp))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_data_files_get_one_line(base, data):
    mutation = data.draw(st.sampled_from(["truncate", "field", "broken_line", "non_object"]))
    rows = [dict(r) for r in ROWS]
    text = VALID_ROWS
    if mutation == "truncate":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif mutation == "field":
        row = data.draw(st.integers(0, len(rows) - 1))
        rows[row][data.draw(st.sampled_from(["query", "positive", "negative", "negatives", "instruction"]))] = \
            data.draw(JUNK)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif mutation == "broken_line":
        lines = text.splitlines(keepends=True)
        line = data.draw(st.integers(0, len(lines) - 1))
        lines[line] = lines[line][: data.draw(st.integers(1, len(lines[line]) - 2))] + "\n"
        text = "".join(lines)
    else:
        lines = text.splitlines(keepends=True)
        lines.insert(data.draw(st.integers(0, len(lines))), json.dumps(data.draw(JUNK)) + "\n")
        text = "".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = workspace(Path(tmp), base, VALID_RECIPE, text)
        assert_one_line_or_success(*run_cli(["train", str(recipe), "--check"]), Path(tmp))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and not s.strip().startswith("{")),
                      st.just('{"query": "q", "positive": ""}'), st.just('{"query": 5, "positive": "p"}'),
                      st.just('{"query": "q", "positive": "p", "negatives": "not a list"}')))
def test_training_on_a_bad_row_writes_nothing(base, line):
    """The full `train` (not --check): refused before any model folder, checkpoint or resolved recipe is written."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = workspace(Path(tmp), base, VALID_RECIPE, VALID_ROWS + line.replace("\n", " ") + "\n")
        code, stderr = run_cli(["train", str(recipe)])
        assert code == 2
        assert_one_line_or_success(code, stderr, Path(tmp))
