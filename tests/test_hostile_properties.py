"""Property-based: every command that reads model folders, bases, evaluation data, corpora and calibration files, on
damaged variants of each (truncated at any byte, empty, binary, another encoding, wrong JSON types, a folder where a
file belongs, a symlink loop). There are two outcomes and no third: exit 2 with one line and no traceback, or the
same result as the undamaged input. (Recipes and training rows: tests/train/test_bad_input_properties.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm2emb.cli import main

TEXTS = ["A man plays a guitar.", "The cat sat on the mat.", "Rates rose again."]
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])  # an uncaught exception fails the test: the traceback a user would see
    return code, err.getvalue()


def refused_in_one_line(code: int, stderr: str) -> bool:
    """True for a clean refusal; False for success; anything else fails the test."""
    assert "Traceback" not in stderr, stderr
    if code == 0:
        return False
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("llm2emb "), stderr
    return True


@st.composite
def damage(draw, names: list[str]):
    """(file name, how) for one of `names`: a function that damages that file inside a copied folder."""
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["truncate", "empty", "binary", "latin-1", "json-type", "folder", "symlink-loop"]))
    cut = draw(st.floats(0, 1, exclude_max=True))
    blob = draw(st.binary(min_size=1, max_size=64))
    junk = draw(JUNK)
    pick = draw(st.integers(0, 10**6))

    def apply(folder: Path) -> None:
        path = folder / name
        data = path.read_bytes() if path.is_file() else b""
        if kind == "truncate":  # at any byte; a cut at a line end leaves a whole, shorter file: one byte more
            end = int(len(data) * cut)
            end += data[end - 1:end] == b"\n" and name.endswith((".jsonl", ".tsv"))
            path.write_bytes(data[:end])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "binary":
            path.write_bytes(blob)
        elif kind == "latin-1":
            path.write_bytes(data.decode("utf-8", "replace").replace("a", "é").encode("latin-1", "replace"))
        elif kind == "json-type" and path.suffix == ".json":
            value = json.loads(data)
            if isinstance(value, dict) and value:
                key = sorted(value)[pick % len(value)]
                value[key] = junk
            path.write_text(json.dumps(value, default=str))
        elif kind == "folder":
            path.unlink()
            path.mkdir()
        elif kind == "symlink-loop":
            path.unlink()
            path.symlink_to(path.name)
    return name, kind, apply


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("fuzz-model")
    out = root / "emb"
    assert run_cli(["convert", "--base", tiny_models["llama"], "--out", out, "--pooling", "mean"])[0] == 0
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert run_cli(["encode", out, "--input", root / "texts.txt", "--output", root / "ref.npy", "--quiet"])[0] == 0
    return out, np.load(root / "ref.npy")


@contextlib.contextmanager
def damaged_copy(source: Path, hurt, name: str):
    """(a fresh folder, a copy of `source` in it with `hurt` applied); reference outputs are not copied."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = shutil.copytree(source, Path(tmp) / name, ignore=shutil.ignore_patterns("ref.json"))
        hurt[2](copy)
        yield Path(tmp), copy


def encodes_like(folder: Path, tmp: Path, reference: np.ndarray, what: str) -> None:
    """`encode` of TEXTS with `folder` refuses in one line or gives `reference`'s vectors."""
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    code, err = run_cli(["encode", folder, "--input", texts, "--output", tmp / "e.npy", "--quiet"])
    if not refused_in_one_line(code, err):
        np.testing.assert_allclose(np.load(tmp / "e.npy"), reference, atol=1e-6, err_msg=what)


MODEL_FILES = ["config.json", "llm2emb.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@PROPERTY
@given(hurt=damage(MODEL_FILES))
def test_encode_and_info_on_a_damaged_model_folder(model, hurt):
    folder, reference = model
    with damaged_copy(folder, hurt, "emb") as (tmp, copy):
        encodes_like(copy, tmp, reference, f"{hurt[0]} damaged ({hurt[1]}) and accepted with other vectors")
        refused_in_one_line(*run_cli(["info", copy]))


BASE_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@PROPERTY
@given(hurt=damage(BASE_FILES))
def test_convert_a_damaged_base(tiny_models, model, hurt):
    with damaged_copy(tiny_models["llama"], hurt, "base") as (tmp, base):
        code, err = run_cli(["convert", "--base", base, "--out", tmp / "emb", "--pooling", "mean"])
        if refused_in_one_line(code, err):
            assert not (tmp / "emb").exists()
            return
        encodes_like(tmp / "emb", tmp, model[1], f"base {hurt[0]} damaged ({hurt[1]}) and converted into another model")


@pytest.fixture(scope="module")
def eval_data(model, tmp_path_factory) -> tuple[Path, str]:
    """An STS file and a BEIR folder, and the score table the undamaged files give."""
    root = tmp_path_factory.mktemp("fuzz-eval")
    (root / "sts.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{i % 5}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(TEXTS, TEXTS[1:] + TEXTS[:1]))))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t.lower()}) + "\n"
                                                for i, t in enumerate(TEXTS)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(TEXTS))))
    code, _ = run_cli(["eval", model[0], "--sts", root / "sts.tsv", "--beir", beir, "--no-cache",
                       "--json", root / "ref.json"])
    assert code == 0
    return root, scores(root / "ref.json")


def scores(path: Path) -> list:
    return [(r["task"].rsplit("/", 2)[-1], r["scores"]) for r in json.loads(path.read_text())["results"]]


EVAL_FILES = ["sts.tsv", "beir/corpus.jsonl", "beir/queries.jsonl", "beir/qrels/test.tsv"]


@PROPERTY
@given(hurt=damage(EVAL_FILES))
def test_eval_on_damaged_sts_and_beir_files(model, eval_data, hurt):
    root, reference = eval_data
    with damaged_copy(root, hurt, "data") as (tmp, copy):
        code, err = run_cli(["eval", model[0], "--sts", copy / "sts.tsv", "--beir", copy / "beir", "--no-cache",
                             "--json", tmp / "out.json"])
        if not refused_in_one_line(code, err):
            assert scores(tmp / "out.json") == reference, f"{hurt[0]} damaged ({hurt[1]}) and scored otherwise"


@PROPERTY
@given(hurt=damage(["corpus.jsonl", "ranges.npy"]))
def test_encode_a_damaged_corpus_or_calibration_file(model, hurt):
    folder, _ = model
    name, kind, apply = hurt
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(TEXTS)))
        np.save(tmp / "ranges.npy", np.stack([-np.ones(64, np.float32), np.ones(64, np.float32)]))
        argv = ["encode", folder, "--input", tmp / "corpus.jsonl", "--id-field", "_id", "--quiet",
                "--precision", "int8", "--calibration", tmp / "ranges.npy"]
        assert run_cli([*argv, "--output", tmp / "ref.npy"])[0] == 0
        apply(tmp)
        code, err = run_cli([*argv, "--output", tmp / "e.npy"])
        if not refused_in_one_line(code, err):
            assert np.array_equal(np.load(tmp / "e.npy"), np.load(tmp / "ref.npy")), f"{name} damaged ({kind})"
