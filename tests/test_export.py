"""Exports give the Embedder's own vectors: sentence-transformers folders (portable and custom) and merged LoRA."""

import json

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.commands.export import export_sentence_transformers

INSTRUCTION = "Given a question, retrieve passages that answer it"
QUERIES = ["what is the capital of France?", "cats", "how do enzymes catalyse chemical reactions in the kitchen?"]
DOCUMENTS = ["Paris is the capital of France.", "The cat sat on the mat and looked at the dog for a long while.",
             "Proteins fold.", "A man is playing a guitar on the street."]
POOLINGS = {
    "mean": "mean",
    "last_token": "last_token",
    "weighted_mean": "weighted_mean",
    "latent_attention": {"type": "latent_attention", "num_latents": 8, "num_heads": 4, "mlp_mult": 2},
    "multi_layer": {"type": "multi_layer", "num_latents": 4, "num_heads": 4},
}


def _randomize_pooler(embedder, seed):
    """Trainable heads start as mean pooling (zero output layers); random weights make the check meaningful."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in embedder.pooler.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def make_model(base, folder, pooling, lora):
    # Plainly bidirectional: sentence-transformers has no causal sink (test_causal_sink.py checks the refusal).
    embedder = Embedder.from_pretrained(base, pooling=pooling, torch_dtype="float32", causal_sink=False)
    embedder.config.default_query_instruction = INSTRUCTION
    # Instruct models ship a chat template, which sentence-transformers would wrap every text in.
    embedder.tokenizer.chat_template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    if embedder.pooler.trainable:
        _randomize_pooler(embedder, seed=1)
    if lora:
        import torch

        torch.manual_seed(2)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        embedder.backbone = get_peft_model(embedder.backbone, config)
    return embedder.save_pretrained(folder)


def st_rule_queries(embedder):
    """Queries pooled as sentence-transformers' Pooling does: it drops as many leading tokens as the prompt has
    when tokenized alone, so the template's trailing space (merged into the first word when joined) costs the
    first text token."""
    import torch

    prompt = f"Instruct: {INSTRUCTION}\nQuery: "
    batch = embedder.tokenize(QUERIES, INSTRUCTION)
    batch["pool_mask"] = batch["attention_mask"].clone()
    batch["pool_mask"][:, : len(embedder.tokenizer(prompt)["input_ids"])] = 0
    with torch.no_grad():
        return torch.nn.functional.normalize(embedder(batch), dim=-1).numpy()


def assert_same_vectors(st, embedder, atol=1e-5):
    if embedder.config.pooling["type"] == "mean":
        np.testing.assert_allclose(st.encode_query(QUERIES), st_rule_queries(embedder), atol=atol)
    else:
        np.testing.assert_allclose(st.encode_query(QUERIES), embedder.encode_queries(QUERIES), atol=atol)
    np.testing.assert_allclose(st.encode_document(DOCUMENTS), embedder.encode_documents(DOCUMENTS), atol=atol)
    np.testing.assert_allclose(st.encode(QUERIES + DOCUMENTS, batch_size=3), embedder.encode(QUERIES + DOCUMENTS),
                               atol=atol)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_sentence_transformers_export_equals_embedder(tiny_qwen2, tmp_path, pooling, lora):
    folder = make_model(tiny_qwen2, tmp_path / "model", POOLINGS[pooling], lora)
    embedder = Embedder.from_pretrained(folder)
    out = export_sentence_transformers(folder, tmp_path / "st")
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    assert not (out / "adapter_config.json").exists()
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == f"Instruct: {INSTRUCTION}\nQuery: "
    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    if pooling in ("mean", "last_token"):
        assert all(t.startswith("sentence_transformers.") for t in types), types
        st = SentenceTransformer(str(out), device="cpu")
    else:
        assert "st_pooling.Llm2EmbPooling" in types
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(out), device="cpu")
        st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert_same_vectors(st, embedder)


def test_exported_transformer_is_bidirectional(tiny_qwen2, tmp_path):
    """sentence-transformers' AutoModel load honours is_causal=False: a causal load would give other vectors."""
    folder = make_model(tiny_qwen2, tmp_path / "model", "mean", lora=False)
    st = SentenceTransformer(str(export_sentence_transformers(folder, tmp_path / "st")), device="cpu")
    causal = Embedder.from_pretrained(tiny_qwen2, pooling="mean", attention="causal", torch_dtype="float32")
    gap = np.abs(st.encode(DOCUMENTS) - causal.encode(DOCUMENTS)).max()
    assert gap > 1e-2


def test_merged_export_equals_adapter_model(tiny_qwen2, tmp_path, capsys):
    folder = make_model(tiny_qwen2, tmp_path / "model", POOLINGS["latent_attention"], lora=True)
    assert (folder / "adapter_config.json").is_file()
    assert main(["export", str(folder), "--merged", "--out", str(tmp_path / "merged")]) == 0
    merged_folder = tmp_path / "merged"
    assert not (merged_folder / "adapter_config.json").exists()
    assert json.loads((merged_folder / "llm2emb.json").read_text())["backbone"] == "weights"
    adapter, standalone = Embedder.from_pretrained(folder), Embedder.from_pretrained(merged_folder)
    np.testing.assert_allclose(standalone.encode_queries(QUERIES), adapter.encode_queries(QUERIES), atol=1e-4)
    np.testing.assert_allclose(standalone.encode_documents(DOCUMENTS), adapter.encode_documents(DOCUMENTS), atol=1e-4)
    # The adapter really changes the vectors, so equality above is not trivially met by ignoring it.
    base = Embedder.from_pretrained(tiny_qwen2, pooling=POOLINGS["latent_attention"], torch_dtype="float32",
                                    causal_sink=False)
    assert np.abs(base.encode(DOCUMENTS) - adapter.encode(DOCUMENTS)).max() > 1e-3


def test_export_cli_sentence_transformers_and_errors(tiny_qwen2, tmp_path, capsys):
    folder = make_model(tiny_qwen2, tmp_path / "model", "last_token", lora=False)
    out = tmp_path / "st"
    assert main(["export", str(folder), "--format", "sentence-transformers", "--out", str(out)]) == 0
    assert "sentence-transformers" in capsys.readouterr().out and (out / "modules.json").is_file()
    assert main(["export", str(folder), "--format", "sentence-transformers", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "--format sentence-transformers, --format onnx or --merged" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--merged", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm2emb export: error: ")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("pooling", ["mean", "last_token", "latent_attention"])
def test_export_truncates_as_embedder_does(tiny_qwen2, tmp_path, pooling):
    """Texts over max_length: both cut the text from its end and keep the prompt (llm2emb.model.tokenization's rule)."""
    folder = make_model(tiny_qwen2, tmp_path / "model", POOLINGS[pooling], lora=False)
    embedder = Embedder.from_pretrained(folder)
    embedder.config.max_length = 40  # a model's settings change through the API and a save (llm2emb.json's digest)
    embedder.save_pretrained(folder, overwrite=True)
    embedder = Embedder.from_pretrained(folder)
    st = SentenceTransformer(str(export_sentence_transformers(folder, tmp_path / "st")), device="cpu",
                             trust_remote_code=True)
    long_documents = [text * 8 for text in DOCUMENTS]
    assert all(embedder.prompt_tokenizer.rows([t], None, None, "document").__next__().cut > 0 for t in long_documents)
    np.testing.assert_allclose(st.encode_document(long_documents), embedder.encode_documents(long_documents), atol=1e-5)
    if pooling != "mean":  # mean pooling's prompt rule differs in one token anyway (see st_rule_queries)
        long_queries = [text * 4 for text in QUERIES]
        np.testing.assert_allclose(st.encode_query(long_queries), embedder.encode_queries(long_queries), atol=1e-5)
