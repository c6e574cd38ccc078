"""Model cards: generated from llm2emb.json and the base they name (the training section: tests/train/test_runner.py)."""

import json

import yaml

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.model.card import CARD_NAME, render
from llm2emb.model.config import EmbedderConfig


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_an_asset_base_is_named_by_its_hub_id_and_licence_through_the_folders_trained_from_it(tmp_path):
    first = tmp_path / "converted"
    first.mkdir()
    EmbedderConfig(base="smollm2-135m", causal_sink=True).save(first)
    second = EmbedderConfig(base=str(first), causal_sink=True)
    meta = front_matter(render(tmp_path / "trained", second))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "model-index" not in meta  # no run, no scores


def test_a_local_base_gives_the_licence_its_own_card_states(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / CARD_NAME).write_text("---\nlicense: mit\nlanguage: en\n---\n# A base\n")
    card = render(tmp_path / "m", EmbedderConfig(base=str(base), causal_sink=False))
    assert front_matter(card)["license"] == "mit" and "base_model" not in front_matter(card)
    assert "The base's licence: mit." in card
    assert "--format sentence-transformers" in card  # plainly bidirectional: it exports for sentence-transformers
    assert "vllm serve m-st --runner pooling" in card and 'OnnxEncoder("m-onnx")' in card
    latent = render(tmp_path / "m", EmbedderConfig(base=str(base), causal_sink=False,
                                                   pooling={"type": "latent_attention"}))
    assert "vllm serve" not in latent and "OnnxEncoder" in latent  # no engine serves a trainable pooler
    unlicensed = render(tmp_path / "m", EmbedderConfig(base=str(tmp_path / "elsewhere")))
    assert "license" not in front_matter(unlicensed) and "check the base's terms" in unlicensed


def test_convert_and_the_merged_export_write_a_card(tiny_qwen2, tmp_path):
    assert main(["convert", "--base", str(tiny_qwen2), "--out", str(tmp_path / "emb"), "--dtype", "float32"]) == 0
    card = (tmp_path / "emb" / CARD_NAME).read_text()
    assert "| causal sink | yes" in card and "| pooling | `" + json.dumps({"type": "mean"}) + "` |" in card
    assert "sentence-transformers, vLLM and TEI cannot load this folder" in card
    assert "vllm serve" not in card and 'OnnxEncoder("emb-onnx")' in card
    Embedder.from_pretrained(tmp_path / "emb")  # the card is no file the folder check refuses
    assert main(["export", str(tmp_path / "emb"), "--merged", "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / CARD_NAME).read_text()
    assert f"(exported from `{tmp_path / 'emb'}`)" in merged
