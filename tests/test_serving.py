"""An exported sentence-transformers folder holds every key vLLM and TEI read, in the layout they parse
(docs/SERVING.md; llm2emb/model/serving.py). Each rule below is what the engine's code does with the file, as of the
versions docs/SERVING.md names: a folder that failed one is served with the wrong pooling, causal attention, or not
at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2emb import Embedder
from llm2emb.commands.export import export_sentence_transformers

INSTRUCTION = "Given a question, retrieve passages that answer it"


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def vllm_pooling(folder: Path) -> dict:
    """vLLM's `get_pooling_config` (vllm/transformers_utils/config.py): the Pooling entry of modules.json is found
    by its type name, which releases before 0.34 match only in the older spelling; every pooling_mode_* key whose
    value is true names the pooling; normalisation is the presence of the Normalize type."""
    modules = read(folder, "modules.json")
    pooling = next((m for m in modules if m["type"] == "sentence_transformers.models.Pooling"), None)
    normalize = any(m["type"] == "sentence_transformers.models.Normalize" for m in modules)
    if pooling is None:
        return {}
    flags = [key for key, value in read(folder, f"{pooling['path']}/config.json").items() if value is True]
    return {"pooling": [f for f in flags if f.startswith("pooling_mode_")], "normalize": normalize}


def tei_pooling(folder: Path) -> str:
    """TEI's router (router/src/lib.rs, `PoolConfig`): 1_Pooling/config.json must hold pooling_mode_cls_token and
    pooling_mode_mean_tokens as booleans (pooling_mode_lasttoken optional); cls wins, then mean, then last token."""
    config = read(folder, "1_Pooling/config.json")
    for required in ("pooling_mode_cls_token", "pooling_mode_mean_tokens"):
        assert isinstance(config.get(required), bool), f"TEI cannot parse 1_Pooling/config.json without {required}"
    if config["pooling_mode_cls_token"]:
        return "cls"
    if config["pooling_mode_mean_tokens"]:
        return "mean"
    assert config.get("pooling_mode_lasttoken") is True, "TEI: no pooling it supports"
    return "last-token"


@pytest.fixture(scope="module", params=["mean", "last_token"])
def exported(request, tiny_qwen2, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"serve-{request.param}")
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling=request.param, torch_dtype="float32", causal_sink=False)
    embedder.config.default_query_instruction = INSTRUCTION
    embedder.config.max_length = 96
    embedder.save_pretrained(folder / "model")
    return request.param, export_sentence_transformers(folder / "model", folder / "st")


def test_vllm_reads_the_pooling_normalisation_and_attention(exported):
    pooling, folder = exported
    expected = {"mean": "pooling_mode_mean_tokens", "last_token": "pooling_mode_lasttoken"}[pooling]
    assert vllm_pooling(folder) == {"pooling": [expected], "normalize": True}
    # vllm 0.34 models/{llama,qwen2,qwen3}.py: `getattr(config, "is_causal", True)` picks the attention
    assert read(folder, "config.json")["is_causal"] is False
    # get_sentence_transformer_tokenizer_config: the file counts only with max_seq_length in it
    assert read(folder, "sentence_bert_config.json")["max_seq_length"] == 96


def test_tei_reads_the_pooling_length_prompts_and_attention(exported):
    pooling, folder = exported
    assert tei_pooling(folder) == {"mean": "mean", "last_token": "last-token"}[pooling]
    config = read(folder, "config.json")
    # router/src/lib.rs `ModelConfig`: required fields
    assert isinstance(config["architectures"], list) and config["model_type"] == "qwen2"
    assert isinstance(config["max_position_embeddings"], int)
    # backends/candle/src/models/{llama,mistral,qwen2,qwen3}.rs read `use_bidirectional_attention`, not is_causal
    assert config["use_bidirectional_attention"] is True
    # `STConfig`: max_seq_length is required in sentence_bert_config.json (the first of ST_CONFIG_NAMES found)
    assert isinstance(read(folder, "sentence_bert_config.json")["max_seq_length"], int)
    # `NewSTConfig`: prompts, for --default-prompt-name query or a request's prompt_name
    assert read(folder, "config_sentence_transformers.json")["prompts"]["query"] == f"Instruct: {INSTRUCTION}\nQuery: "
    assert (folder / "tokenizer.json").is_file()  # TEI loads only fast tokenizers


def test_the_older_layout_loads_in_sentence_transformers_as_its_own_does(exported):
    from sentence_transformers import SentenceTransformer

    pooling, folder = exported
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == 96
    assert [type(module).__name__ for module in model] == ["Transformer", "Pooling", "Normalize"]
    assert model[1].get_config_dict()["pooling_mode"] == {"mean": "mean", "last_token": "lasttoken"}[pooling]
