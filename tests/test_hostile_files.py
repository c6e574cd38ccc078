"""Damaged and weightless checkpoints: refused in one line with exit 2, never loaded as a random model; a pickle
carrying code is never run (issue 30's table, row by row)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from llm2emb.cli import main
from llm2emb.errors import UserError


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "emb"
    assert main(["convert", "--base", str(llama), "--out", str(out), "--pooling", "mean"]) == 0
    return out


def copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def one_line_error(capsys, command: list, *fragments: str) -> str:
    assert main([str(a) for a in command]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith(f"llm2emb {command[0]}: error: ") and "Traceback" not in "\n".join(lines)
    for fragment in fragments:
        assert fragment in last, last
    return last


def test_a_base_with_none_of_its_weights_is_refused_not_made_random(llama, tmp_path, capsys):
    for name, write in [("model.safetensors", lambda p: save_file({"unrelated": torch.zeros(3)}, str(p))),
                        ("pytorch_model.bin", lambda p: torch.save({"unrelated": torch.zeros(3)}, p))]:
        base = copy(llama, tmp_path / name)
        (base / "model.safetensors").unlink()
        write(base / name)
        one_line_error(capsys, ["convert", "--base", base, "--out", tmp_path / f"out-{name}"],
                       f"{base / name}: 20 of 20 weights the LlamaModel architecture needs are missing "
                       "(embed_tokens.weight, layers.0.")
        assert not (tmp_path / f"out-{name}").exists()


def test_one_missing_weight_is_named_and_unused_ones_only_warn(llama, tmp_path, capsys, caplog):
    base = copy(llama, tmp_path / "base")
    weights = load_file(str(base / "model.safetensors"))
    del weights["norm.weight"]
    save_file(weights, str(base / "model.safetensors"))
    one_line_error(capsys, ["convert", "--base", base, "--out", tmp_path / "o"],
                   "1 of 20 weights the LlamaModel architecture needs are missing (norm.weight);")

    extra = copy(llama, tmp_path / "extra")
    weights = load_file(str(extra / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["embed_tokens.weight"].clone(), "stray.bias": torch.zeros(2)},
              str(extra / "model.safetensors"))
    assert main(["convert", "--base", str(extra), "--out", str(tmp_path / "e")]) == 0
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert warned == [f"{extra / 'model.safetensors'}: 1 weights the LlamaModel architecture does not use were "
                      "ignored (stray.bias)"]  # the LM head is no surprise for a headless embedder


def test_a_pickle_that_carries_code_is_refused_and_never_run(llama, tmp_path):
    base = copy(llama, tmp_path / "evil")
    (base / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    payload = (f"import os, torch\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               f"torch.save({{'x': E()}}, {str(base / 'pytorch_model.bin')!r})\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    result = subprocess.run([sys.executable, "-m", "llm2emb.cli", "convert", "--base", str(base), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.strip().splitlines()[-1].endswith(
        "pytorch_model.bin: this pickle checkpoint holds more than weights (code or objects that torch's weights-only "
        "loading refuses); llm2emb does not run it: convert it to safetensors where you trust it")
    assert "Traceback" not in result.stderr


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_a_truncated_model_folder_is_one_line_for_every_command(converted, tmp_path, capsys):
    folder = copy(converted, tmp_path / "trunc")
    truncate(folder / "model.safetensors")
    texts = tmp_path / "t.txt"
    texts.write_text("a b\nc d\n")
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta b\tc d\n4\tc d\ta b\n")
    expected = f"{folder}/model.safetensors is truncated ("
    for command in (["encode", folder, "--input", texts, "--output", tmp_path / "e.npy"],
                    ["eval", folder, "--sts", sts], ["export", folder, "--merged", "--out", tmp_path / "x"],
                    ["info", folder]):
        one_line_error(capsys, command, expected, "the folder is damaged: re-convert or re-train it")
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "x").exists()


def test_a_truncated_base_a_broken_config_and_a_missing_tokenizer(llama, converted, tmp_path, capsys):
    base = copy(llama, tmp_path / "base")
    truncate(base / "model.safetensors", 0.001)
    one_line_error(capsys, ["convert", "--base", base, "--out", tmp_path / "o"],
                   f"{base}/model.safetensors is truncated or corrupt; the folder is damaged: re-download it")
    broken = copy(converted, tmp_path / "config")
    (broken / "config.json").write_text('{"model_type": ')
    texts = tmp_path / "t.txt"
    texts.write_text("a b\n")
    one_line_error(capsys, ["encode", broken, "--input", texts, "--output", tmp_path / "e.npy"],
                   f"{broken}/config.json is truncated or corrupt")
    no_tokenizer = copy(converted, tmp_path / "tok")
    (no_tokenizer / "tokenizer.json").unlink()
    one_line_error(capsys, ["encode", no_tokenizer, "--input", texts, "--output", tmp_path / "e.npy"],
                   f"{no_tokenizer}/tokenizer.json: missing since this model folder was written")
    base_without = copy(llama, tmp_path / "base-tok")
    (base_without / "tokenizer.json").unlink()
    one_line_error(capsys, ["convert", "--base", base_without, "--out", tmp_path / "o2"],
                   f"{base_without}: no tokenizer file (one of tokenizer.json,")


def test_a_base_whose_tokenizer_config_names_another_bos_is_refused_not_made_another_recipe(llama, tmp_path, capsys):
    def with_bos(name: str, bos) -> Path:
        base = copy(llama, tmp_path / name)
        config = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
        return base

    for name, bos in [("new", "ab"), ("ordinary", "a")]:  # transformers would add or promote it as special
        junk = with_bos(name, bos)
        one_line_error(capsys, ["convert", "--base", junk, "--out", tmp_path / "o1"],
                       f"{junk / 'tokenizer_config.json'}: names {bos!r} as a special token, which "
                       f"{junk / 'tokenizer.json'} does not hold as one")
    grown = copy(llama, tmp_path / "grown")  # consistent files, but with a token the weights have no row for
    tokenizer = AutoTokenizer.from_pretrained(grown)
    tokenizer.add_tokens(["<|zz|>"], special_tokens=True)
    tokenizer.save_pretrained(grown)
    one_line_error(capsys, ["convert", "--base", grown, "--out", tmp_path / "o1"],
                   f"{grown}: the tokenizer has 401 tokens and the weights embed 400 (beyond them: '<|zz|>')")
    gone = with_bos("gone", None)  # no BOS and no chat template: nothing for the default template to lead with
    one_line_error(capsys, ["convert", "--base", gone, "--out", tmp_path / "o2"],
                   f"{gone}: text template bos: the base's tokenizer has no BOS token", "--text-template none")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert main(["convert", "--base", str(gone), "--out", str(tmp_path / "o3"), "--text-template", "none"]) == 0


def test_a_model_folder_edited_into_other_valid_values_is_refused(converted, tmp_path, capsys):
    """A value changed into another valid one (a tokenizer without its pre-tokenizer, another max_length) would give
    other vectors with no error: the digests llm2emb.json keeps refuse it."""
    texts = tmp_path / "t.txt"
    texts.write_text("a b\n")
    edited = copy(converted, tmp_path / "tok")
    tokenizer = json.loads((edited / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = None
    (edited / "tokenizer.json").write_text(json.dumps(tokenizer))
    one_line_error(capsys, ["encode", edited, "--input", texts, "--output", tmp_path / "e.npy"],
                   f"{edited}/tokenizer.json: changed since this model folder was written")
    relabelled = copy(converted, tmp_path / "cfg")
    config = json.loads((relabelled / "llm2emb.json").read_text())
    config["max_length"] = 3
    (relabelled / "llm2emb.json").write_text(json.dumps(config))
    one_line_error(capsys, ["info", relabelled], "llm2emb.json: its values were changed after llm2emb wrote it")


def test_train_refuses_a_weightless_base_before_writing_anything(llama, tmp_path, capsys):
    base = copy(llama, tmp_path / "base")
    save_file({"unrelated": torch.zeros(3)}, str(base / "model.safetensors"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i}"}) + "\n"
                                                 for i in range(8)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{base: {base}}}\noutput_dir: {tmp_path / 'run'}\nreport_to: []\n"
                      "stages: [{name: s, max_steps: 2, batch_size: 4, datasets: [{path: rows.jsonl}]}]\n")
    one_line_error(capsys, ["train", recipe], "20 of 20 weights the LlamaModel architecture needs are missing")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_weights_check_reads_the_loading_report_of_any_model_class(llama):
    from transformers import AutoModelForCausalLM

    from llm2emb.model.weights import load_checked

    model = load_checked(AutoModelForCausalLM, llama)  # tied head: nothing missing
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(UserError, match=r"1 of 21 weights the LlamaForCausalLM architecture needs are missing "
                                        r"\(lm_head.weight\)"):
        load_checked(AutoModelForCausalLM, llama, tie_word_embeddings=False)  # an untied head the file lacks


def test_a_second_encode_into_the_same_output_is_refused_while_the_first_runs(converted, tmp_path, capsys):
    import numpy as np

    from llm2emb.files import exclusive_lock
    from llm2emb.retrieval.corpus import sidecar

    texts = tmp_path / "t.txt"
    texts.write_text("a b\nc d\n")
    out = tmp_path / "e.npy"
    with exclusive_lock(sidecar(out, "lock-0"), "--output", out):  # what a running encode holds
        one_line_error(capsys, ["encode", converted, "--input", texts, "--output", out],
                       f"--output: {out} is in use by a running process (pid {os.getpid()})")
    assert not out.exists()
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(out), "--quiet"]) == 0
    assert np.load(out).shape[0] == 2 and not sidecar(out, "lock-0").exists()  # the lock leaves with its run


def test_a_weightless_sentence_transformers_teacher_or_model_is_refused(tiny_st_teacher, tmp_path, capsys):
    folder = copy(tiny_st_teacher, tmp_path / "st")
    weights = next(folder.rglob("model.safetensors"))
    save_file({"unrelated": torch.zeros(3)}, str(weights))
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta b\tc d\n4\tc d\ta b\n")
    one_line_error(capsys, ["eval", folder, "--sts", sts],
                   f"{weights}: 20 of 20 weights the LlamaModel architecture needs are missing")


def test_data_files_cut_short_or_not_utf8_and_inconsistent_beir_folders_are_named(converted, tmp_path, capsys):
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta b\tc d\n4\tc d\ta b")  # the last row lost its line end
    one_line_error(capsys, ["eval", converted, "--sts", sts],
                   f"{sts}: the last line has no line end, as in a file cut short; if the file is whole, end it")
    sts.write_bytes("score\tsentence1\tsentence2\n1\tcaf\xe9\tc d\n4\tc d\ta b\n".encode("latin-1"))
    one_line_error(capsys, ["eval", converted, "--sts", sts], f"{sts}: not UTF-8 text (byte 0xe9")
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "a b"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "c d"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    one_line_error(capsys, ["eval", converted, "--beir", beir],
                   f"{beir / 'corpus.jsonl'}: 1 document id(s) judged relevant in {beir / 'qrels' / 'test.tsv'} are "
                   "absent, e.g. 'd2'")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    one_line_error(capsys, ["eval", converted, "--beir", beir],
                   f"{beir / 'qrels' / 'test.tsv'}: no query has a relevant document (score > 0)")


def test_an_unreadable_calibration_file_and_a_wrong_typed_llm2emb_json_are_named(converted, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("a b\n")
    calibration = tmp_path / "ranges.npy"
    calibration.write_bytes(b"\x93NUMPY not really")
    one_line_error(capsys, ["encode", converted, "--input", texts, "--output", tmp_path / "e.npy", "--precision",
                            "int8", "--calibration", calibration],
                   f"--calibration {calibration}: not a readable .npy matrix")
    folder = copy(converted, tmp_path / "typed")
    config = json.loads((folder / "llm2emb.json").read_text())
    (folder / "llm2emb.json").write_text(json.dumps({**config, "normalize": 1}))
    one_line_error(capsys, ["info", folder], f"{folder / 'llm2emb.json'}: normalize: Input should be a valid boolean")
