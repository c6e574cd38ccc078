"""The ONNX export runs in ONNX Runtime with the Embedder's own vectors: every pooler, the causal sink, LoRA merged."""

import json

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from llm2emb import Embedder, UserError
from llm2emb.cli import main
from llm2emb.commands.export_onnx import INT8_NAME, SETTINGS_NAME, OnnxEncoder, export_onnx
from llm2emb.model.tokenization import UnembeddableText
from tests.conftest import EVERY_POOLING

INSTRUCTION = "Given a question, retrieve passages that answer it"
QUERIES = ["what is the capital of France?", "cats", "how do enzymes catalyse chemical reactions in the kitchen?"]
DOCUMENTS = ["Paris is the capital of France.", "The cat sat on the mat and looked at the dog for a long while.",
             "Proteins fold.", "A man is playing a guitar on the street."]


def make_model(base, folder, pooling, lora=False, causal_sink=None):
    embedder = Embedder.from_pretrained(base, pooling=pooling, torch_dtype="float32", causal_sink=causal_sink)
    embedder.config.default_query_instruction = INSTRUCTION
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trainable heads start as mean pooling; random weights make the comparison meaningful
        for parameter in embedder.pooler.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    if lora:
        torch.manual_seed(2)
        embedder.backbone = get_peft_model(embedder.backbone, LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    return embedder.save_pretrained(folder)


def assert_same_vectors(encoder: OnnxEncoder, embedder: Embedder, atol=1e-4):
    np.testing.assert_allclose(encoder.encode_queries(QUERIES), embedder.encode_queries(QUERIES), atol=atol)
    np.testing.assert_allclose(encoder.encode_documents(DOCUMENTS), embedder.encode_documents(DOCUMENTS), atol=atol)
    np.testing.assert_allclose(encoder.encode(DOCUMENTS[:1]), embedder.encode(DOCUMENTS[:1]), atol=atol)  # no padding
    np.testing.assert_allclose(encoder.encode(QUERIES + DOCUMENTS, batch_size=2),
                               embedder.encode(QUERIES + DOCUMENTS), atol=atol)


@pytest.mark.parametrize("pooling", [p for p in EVERY_POOLING if p != "weighted_mean"],
                         ids=lambda p: p if isinstance(p, str) else p["type"])
def test_onnx_runtime_gives_the_embedders_vectors(tiny_qwen2, tmp_path, pooling):
    folder = make_model(tiny_qwen2, tmp_path / "model", pooling)
    out = export_onnx(folder, tmp_path / "onnx")
    embedder = Embedder.from_pretrained(folder)
    assert embedder.config.causal_sink  # the default the export has to trace
    assert_same_vectors(OnnxEncoder(out), embedder)
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["inputs"] == ["input_ids", "attention_mask", "pool_mask"] and settings["dim"] == embedder.dim
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_a_lora_model_exports_merged_and_left_padding_and_plain_bidirectional_hold(tiny_qwen2, tmp_path):
    folder = make_model(tiny_qwen2, tmp_path / "model", "weighted_mean", lora=True, causal_sink=False)
    out = export_onnx(folder, tmp_path / "onnx")
    embedder = Embedder.from_pretrained(folder)
    assert embedder.config.backbone == "adapter"
    assert_same_vectors(OnnxEncoder(out), embedder)
    base = Embedder.from_pretrained(tiny_qwen2, pooling="weighted_mean", torch_dtype="float32", causal_sink=False)
    assert np.abs(OnnxEncoder(out).encode(DOCUMENTS) - base.encode(DOCUMENTS)).max() > 1e-3  # the adapter is in

    embedder.config.padding_side = "left"
    embedder.save_pretrained(tmp_path / "left")
    left = export_onnx(tmp_path / "left", tmp_path / "onnx-left")
    assert_same_vectors(OnnxEncoder(left), Embedder.from_pretrained(tmp_path / "left"))


@pytest.mark.parametrize("pooling", ["mean", {"type": "latent_attention", "num_latents": 8, "num_heads": 4}],
                         ids=["mean", "latent_attention"])
def test_openvino_compiles_the_same_file_to_the_same_vectors(tiny_qwen2, tmp_path, pooling):
    """The client a CPU user reaches for beside ONNX Runtime: `Core.compile_model` on model.onnx (the sink inside)."""
    pytest.importorskip("openvino")
    folder = make_model(tiny_qwen2, tmp_path / "model", pooling)
    out = export_onnx(folder, tmp_path / "onnx", int8=True)
    assert_same_vectors(OnnxEncoder(out, runtime="openvino", threads=1), Embedder.from_pretrained(folder))
    int8 = OnnxEncoder(out, graph=INT8_NAME, runtime="openvino").encode(DOCUMENTS)
    reference = OnnxEncoder(out, graph=INT8_NAME).encode(DOCUMENTS)
    assert (int8 * reference).sum(axis=1).min() > 0.99  # OpenVINO runs ONNX Runtime's quantized graph alike
    with pytest.raises(UserError, match="runtime must be one of onnxruntime, openvino, got 'tensorrt'"):
        OnnxEncoder(out, runtime="tensorrt")


def test_refusals_name_what_is_wrong(tiny_qwen2, tmp_path):
    folder = make_model(tiny_qwen2, tmp_path / "model", "mean")
    with pytest.raises(UserError, match=f"{tmp_path / 'model'}: no llm2emb_onnx.json; not an llm2emb ONNX export"):
        OnnxEncoder(folder)
    out = export_onnx(folder, tmp_path / "onnx")
    with pytest.raises(UserError, match=r"has no model_int8.onnx \(it holds model.onnx\)"):
        OnnxEncoder(out, graph=INT8_NAME)
    with pytest.raises(UnembeddableText, match="text 1"):
        OnnxEncoder(out).encode(["a text", ""])
    Embedder.from_pretrained(tiny_qwen2, torch_dtype="float32", rope_scaling="yarn:4").save_pretrained(tmp_path / "rope")
    with pytest.raises(UserError, match="RoPE scaling is not exported to ONNX yet; export --merged instead"):
        export_onnx(tmp_path / "rope", tmp_path / "onnx-rope")
    assert not (tmp_path / "onnx-rope").exists()


def test_the_int8_copy_and_the_cli(tiny_qwen2, tmp_path, capsys):
    folder = make_model(tiny_qwen2, tmp_path / "model", "mean")
    assert main(["export", str(folder), "--format", "onnx", "--int8", "--out", str(tmp_path / "onnx")]) == 0
    assert "ONNX, with int8" in capsys.readouterr().out
    fp32, int8 = OnnxEncoder(tmp_path / "onnx"), OnnxEncoder(tmp_path / "onnx", graph=INT8_NAME)
    weights = onnx.load(str(tmp_path / "onnx" / INT8_NAME)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights)  # the linear weights are int8 now
    config = json.loads((folder / "config.json").read_text())
    down = (config["intermediate_size"], config["hidden_size"])
    kept = [w for w in weights if tuple(w.dims) == down]  # the MLP's down projections stay fp32, one per layer
    assert len(kept) == config["num_hidden_layers"] and {w.data_type for w in kept} == {onnx.TensorProto.FLOAT}
    a, b = fp32.encode(DOCUMENTS), int8.encode(DOCUMENTS)
    assert np.isfinite(b).all() and 0 < np.abs(a - b).max() and (a * b).sum(axis=1).min() > 0.9
    settings = json.loads((tmp_path / "onnx" / SETTINGS_NAME).read_text())
    assert 0.98 <= settings["int8_min_cosine"] < 1

    assert main(["export", str(folder), "--merged", "--int8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llm2emb export: error: --int8 is for --format onnx"] and not (tmp_path / "x").exists()
    assert main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_an_int8_copy_far_from_fp32_is_refused(tiny_qwen2, tmp_path, capsys, monkeypatch):
    folder = make_model(tiny_qwen2, tmp_path / "model", "mean")
    monkeypatch.setattr("llm2emb.commands.export_onnx.INT8_MIN_COSINE", 1.01)  # no int8 copy reaches it
    assert main(["export", str(folder), "--format", "onnx", "--int8", "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8 ONNX graph's vectors differ from fp32" in err[0] and "without --int8" in err[0]
    assert not (tmp_path / "onnx").exists()
