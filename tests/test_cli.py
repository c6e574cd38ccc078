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
    texts.write_text("A man plays a guitar.\nThe cat sat on the mat.\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out), "--instruction", "Find it"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 64)
    expected = Embedder.from_pretrained(converted).encode(["A man plays a guitar.", "The cat sat on the mat."],
                                                          instruction="Find it")
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    half = tmp_path / "half.npy"
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(half), "--instruction", "Find it",
                 "--dtype", "bfloat16"]) == 0
    in_bf16 = Embedder.from_pretrained(converted, torch_dtype="bfloat16").encode(
        ["A man plays a guitar.", "The cat sat on the mat."], instruction="Find it")
    np.testing.assert_allclose(np.load(half), in_bf16, atol=1e-6)
    assert np.abs(np.load(half) - vectors).max() > 1e-4  # bfloat16 was used, not the folder's float32
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


def test_encode_refuses_blank_lines_instead_of_shifting_rows(converted, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("A man plays a guitar.\n\nThe cat sat on the mat.\n   \n")
    out = tmp_path / "emb.npy"
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llm2emb encode: error: {texts}: blank line(s) 2, 4: ")
    assert not out.exists()


def test_encode_refuses_an_instruction_that_leaves_a_line_no_token(converted, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("A man plays a guitar.\n")
    out = tmp_path / "emb.npy"
    out.write_bytes(b"earlier result")
    instruction = " ".join(["Given a premise, retrieve a hypothesis that is entailed by the premise."] * 60)
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out), "--instruction", instruction]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"llm2emb encode: error: {texts}:1: the prompt around the text")
    assert "tokens of max_length 512, leaving the text none" in err[0]
    assert out.read_bytes() == b"earlier result"  # nothing already written is lost


def test_encode_killed_mid_run_leaves_no_partial_output(converted, tmp_path):
    """SIGKILL at staggered moments: the output is the earlier file or the whole new matrix, never a partial one."""
    import os
    import signal
    import time

    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"sentence number {i} about a cat on a mat\n" for i in range(3000)))
    out = tmp_path / "emb.npy"
    np.save(out, np.zeros((1, 1), np.float32))
    command = [sys.executable, "-m", "llm2emb.cli", "encode", str(converted), "--input", str(texts),
               "--output", str(out), "--batch-size", "512"]
    started = time.perf_counter()
    assert subprocess.run(command, capture_output=True).returncode == 0
    full = time.perf_counter() - started
    finished = np.load(out)
    assert finished.shape == (3000, 64)
    for fraction in (0.5, 0.8, 0.9, 0.95, 0.99):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        loaded = np.load(out)  # never raises: the file under the name is always whole
        assert loaded.shape == (3000, 64)
        np.testing.assert_array_equal(loaded, finished)


def test_an_os_error_is_one_line_not_a_traceback(converted, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("A man plays a guitar.\n")
    out = tmp_path / ("x" * 300) / "emb.npy"  # a folder name over the filesystem's 255-byte limit
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm2emb encode: error: File name too long: ")


def test_help_and_the_package_root_load_no_torch():
    """`import llm2emb` and `llm2emb --help` stay light: torch and transformers load only when a command runs."""
    probe = ("import sys, contextlib, io\n"
             "import llm2emb, llm2emb.errors\n"
             "from llm2emb.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "    try:\n"
             "        main(['--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             "assert 'convert' in out.getvalue() and 'train' in out.getvalue()\n"
             "print(sorted({'torch', 'transformers', 'accelerate'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert Embedder.__module__ == "llm2emb.model.embedder"  # the lazy attribute still gives the class
