"""`--device`: the GPU by default when there is one (the local rank's under torchrun), the CPU otherwise, and a GPU
that is not there refused in one line by every inference command."""

from __future__ import annotations

import pytest
import torch

from llm2emb.cli import main
from llm2emb.devices import pick_device
from llm2emb.errors import UserError


def test_auto_is_the_cpu_without_cuda_and_the_local_ranks_gpu_with_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("CPU") == "cpu"
    with pytest.raises(UserError, match=r"--device cuda: no CUDA GPU is visible to torch here \(use --device cpu"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == "cuda:0" and pick_device("cuda") == "cuda:0" and pick_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == "cuda:1" and pick_device("cuda") == "cuda:1"
    with pytest.raises(UserError, match=r"--device cuda:2: only 2 CUDA GPU\(s\) are visible"):
        pick_device("cuda:2")
    with pytest.raises(UserError, match=r"--device gpu0: expected auto, cpu, cuda or cuda:N"):
        pick_device("gpu0")


@pytest.fixture(scope="module")
def converted(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("devices") / "emb"
    assert main(["convert", "--base", str(tiny_qwen2), "--out", str(out), "--pooling", "mean"]) == 0
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_every_inference_command_refuses_a_missing_gpu_in_one_line(converted, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("a b\nc d\n")
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta b\tc d\n4\tc d\ta b\n")
    commands = [["encode", converted, "--input", texts, "--output", tmp_path / "e.npy"],
                ["eval", converted, "--sts", sts],
                ["export", converted, "--merged", "--out", tmp_path / "x"],
                ["mine", converted, "--corpus", tmp_path / "c.jsonl", "--pairs", tmp_path / "p.jsonl", "--out",
                 tmp_path / "n.jsonl"],
                ["merge", converted, converted, "--out", tmp_path / "m"],
                ["synth", "--corpus", texts, "--generator", converted, "--out", tmp_path / "s.jsonl"]]
    for command in commands:
        capsys.readouterr()
        assert main([str(a) for a in command] + ["--device", "cuda"]) == 2, command[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == (f"llm2emb {command[0]}: error: --device cuda: no CUDA GPU is visible to "
                                            "torch here (use --device cpu or auto)"), err


def test_encode_and_eval_say_where_they_ran(converted, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("a b\nc d\n")
    assert main(["encode", str(converted), "--input", str(texts), "--output", str(tmp_path / "e.npy"),
                 "--device", "cpu"]) == 0
    assert "x 64 float32 on cpu (" in capsys.readouterr().out
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta b\tc d\n4\tc d\ta b\n")
    assert main(["eval", str(converted), "--sts", str(sts)]) == 0
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"evaluated on {expected}" in capsys.readouterr().err
