"""The CLI end to end on a tiny model, and every error path: one line, exit code 2, no traceback."""

import json
import subprocess
import sys

import numpy as np
import pytest

from llm2emb import Embedder
from llm2emb.cli import main


@pytest.fixture(scope="module")
def converted(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "emb"
    assert main(["convert", "--base", str(tiny_qwen2), "--out", str(out), "--pooling", "last_token",
                 "--query-instruction", "Given a question, retrieve passages", "--dtype", "float32"]) == 0
    return out


def test_convert_encode_info_end_to_end(converted, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("A man plays a guitar.\n\nThe cat sat on the mat.\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out), "--instruction", "Find it"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 64)
    expected = Embedder.from_pretrained(converted).encode(["A man plays a guitar.", "The cat sat on the mat."],
                                                          instruction="Find it")
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attention"] == "bidirectional" and info["is_causal"] is False
    assert json.loads(info["pooling"]) == {"type": "last_token"}
    assert info["default_query_instruction"] == "Given a question, retrieve passages"


def test_convert_with_json_pooling(tiny_qwen2, tmp_path):
    spec = '{"type": "latent_attention", "num_latents": 8, "num_heads": 4}'
    assert main(["convert", "--base", str(tiny_qwen2), "--out", str(tmp_path / "m"), "--pooling", spec]) == 0
    assert (tmp_path / "m" / "pooling.safetensors").is_file()
    assert Embedder.from_pretrained(tmp_path / "m").config.pooling["num_latents"] == 8


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "llm2emb.cli", *map(str, args)], capture_output=True, text=True)
    return result.returncode, result.stderr.strip()


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("llm2emb ")
    for fragment in fragments:
        assert fragment in last, last


def test_error_missing_base(tmp_path):
    assert_one_line_error(*run_cli("convert", "--base", tmp_path / "nope", "--out", tmp_path / "o"), "no such file")


def test_error_unknown_architecture(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch"}))
    assert_one_line_error(*run_cli("convert", "--base", tmp_path / "weird", "--out", tmp_path / "o"),
                          "cannot read the model config")


def test_error_bad_pooling_name(tiny_qwen2, tmp_path):
    code, stderr = run_cli("convert", "--base", tiny_qwen2, "--out", tmp_path / "o", "--pooling", "max")
    assert_one_line_error(code, stderr, "unknown type 'max'")
    assert not (tmp_path / "o").exists()


def test_error_gguf_without_gguf_package(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    code = (
        "import sys; sys.modules['gguf'] = None; from llm2emb.cli import main; "
        f"sys.exit(main(['convert', '--base', {str(model)!r}, '--out', {str(tmp_path / 'o')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert_one_line_error(result.returncode, result.stderr.strip(), "needs the gguf package")


def test_error_empty_and_missing_input(converted, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_one_line_error(*run_cli("encode", converted, "--input", empty, "--output", tmp_path / "e.npy"),
                          "empty.txt: input has no text lines")
    assert_one_line_error(*run_cli("encode", converted, "--input", tmp_path / "x.txt", "--output", tmp_path / "e.npy"),
                          "x.txt: input file not found")
    assert not (tmp_path / "e.npy").exists()


def test_error_convert_into_non_empty_folder_keeps_it(tiny_qwen2, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert_one_line_error(*run_cli("convert", "--base", tiny_qwen2, "--out", tmp_path / "o"), "not empty")
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_error_info_on_non_model_folder(tmp_path):
    assert_one_line_error(*run_cli("info", tmp_path), "not an llm2emb model folder")
