"""Embedder: padding invariance, instructions, encode, save/load and PEFT round trips."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel

from llm2emb import Embedder, UserError
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.backbone import VERIFIED_MODEL_TYPES
from tests.conftest import EVERY_POOLING

TEXTS = [
    "A man is playing a guitar on the street.",
    "The cat sat.",
    "Proteins fold into three-dimensional structures; enzymes catalyse reactions in the cell.",
]


def perturb_pooler(embedder: Embedder) -> None:
    """Trainable poolers start equal to mean pooling; give them weights so their own path is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in embedder.pooler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)


def embed_alone_and_batched(embedder: Embedder, side: str) -> float:
    embedder.config.padding_side = side
    batched = embedder.forward(embedder.tokenize(TEXTS, "Given a sentence, find its paraphrase"))
    worst = 0.0
    for i, text in enumerate(TEXTS):
        alone = embedder.forward(embedder.tokenize([text], "Given a sentence, find its paraphrase"))
        worst = max(worst, (alone[0] - batched[i]).abs().max().item())
    return worst


@pytest.mark.parametrize("pooling", EVERY_POOLING, ids=lambda p: p if isinstance(p, str) else p["type"])
@torch.no_grad()
def test_padding_invariance_left_and_right_per_pooler(tiny_qwen2, pooling):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling=pooling, torch_dtype=torch.float32)
    perturb_pooler(embedder)
    assert embed_alone_and_batched(embedder, "right") <= 1e-5
    assert embed_alone_and_batched(embedder, "left") <= 1e-5


@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
@torch.no_grad()
def test_padding_invariance_per_architecture(tiny_models, arch):
    embedder = Embedder.from_pretrained(tiny_models[arch], pooling="last_token", torch_dtype=torch.float32)
    assert embed_alone_and_batched(embedder, "right") <= 1e-5
    assert embed_alone_and_batched(embedder, "left") <= 1e-5


def test_instruction_tokens_are_masked_out_of_pooling(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32)
    batch = embedder.tokenize(["The cat sat."], "Given a sentence, find its paraphrase")
    text_ids = embedder.tokenizer("The cat sat.", add_special_tokens=False)["input_ids"]
    pooled = batch["input_ids"][0][batch["pool_mask"][0].bool()].tolist()
    assert pooled == text_ids
    assert batch["attention_mask"].sum() > batch["pool_mask"].sum()


def test_last_token_pooling_appends_eos(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling="last_token", torch_dtype=torch.float32)
    batch = embedder.tokenize(["The cat sat.", "A man is playing a guitar on the street."])
    lengths = batch["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, length - 1] == embedder.tokenizer.eos_token_id
    long_text = " ".join(["word"] * 400)
    truncated = embedder.tokenize([long_text], max_length=32)
    assert truncated["input_ids"].shape[1] == 32
    assert truncated["input_ids"][0, -1] == embedder.tokenizer.eos_token_id


def test_encode_normalises_keeps_order_and_truncates_dim(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    vectors = embedder.encode(TEXTS, batch_size=2)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([embedder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
    small = embedder.encode(TEXTS, dim=16)
    assert small.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="dim must be between"):
        embedder.encode(TEXTS, dim=65)


def test_queries_get_instruction_documents_do_not(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    embedder.config.default_query_instruction = "Given a question, retrieve passages that answer it"
    plain = embedder.encode(TEXTS)
    queries = embedder.encode_queries(TEXTS)
    documents = embedder.encode_documents(TEXTS)
    np.testing.assert_allclose(documents, plain, atol=1e-6)
    assert np.abs(queries - plain).max() > 1e-3


def test_forward_keeps_gradients_for_trainable_pooler(tiny_qwen2):
    embedder = Embedder.from_pretrained(
        tiny_qwen2, pooling={"type": "latent_attention", "num_latents": 8, "num_heads": 4}, torch_dtype=torch.float32
    )
    embedder.forward(embedder.tokenize(TEXTS)).pow(2).sum().backward()
    grads = [p.grad for p in embedder.pooler.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("pooling", EVERY_POOLING, ids=lambda p: p if isinstance(p, str) else p["type"])
def test_save_load_round_trip(tiny_qwen2, tmp_path, pooling):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling=pooling, torch_dtype=torch.float32)
    perturb_pooler(embedder)
    before = embedder.encode(TEXTS, instruction="Find paraphrases")
    embedder.save_pretrained(tmp_path / "model")
    reloaded = Embedder.from_pretrained(tmp_path / "model")
    assert reloaded.config.pooling == embedder.config.pooling
    np.testing.assert_array_equal(reloaded.encode(TEXTS, instruction="Find paraphrases"), before)


def test_save_refuses_to_overwrite_and_keeps_existing_files(tiny_qwen2, tmp_path):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        embedder.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_load_conflicting_pooling_is_refused(tiny_qwen2, tmp_path):
    Embedder.from_pretrained(tiny_qwen2, pooling="mean").save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="built with pooling 'mean'"):
        Embedder.from_pretrained(tmp_path / "m", pooling="last_token")


def test_unknown_pooling_is_refused(tiny_qwen2):
    with pytest.raises(UserError, match="unknown type 'max'"):
        Embedder.from_pretrained(tiny_qwen2, pooling="max")


def test_peft_adapter_round_trip_and_plain_peft_loading(tiny_qwen2, tmp_path):
    """An adapter saved by Embedder loads with plain PEFT onto the converted folder, same hidden states."""
    converted = tmp_path / "converted"
    Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32).save_pretrained(converted)
    embedder = Embedder.from_pretrained(converted)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    embedder.backbone = get_peft_model(embedder.backbone, lora)
    before = embedder.encode(TEXTS)
    embedder.save_pretrained(tmp_path / "adapter")

    reloaded = Embedder.from_pretrained(tmp_path / "adapter")
    assert reloaded.config.backbone == "adapter"
    np.testing.assert_allclose(reloaded.encode(TEXTS), before, atol=1e-6)
    base_only = Embedder.from_pretrained(converted).encode(TEXTS)
    assert np.abs(base_only - before).max() > 1e-3  # the adapter really changes the model

    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(converted), tmp_path / "adapter").eval()
    batch = reloaded.tokenize(TEXTS)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = reloaded.backbone(**inputs).last_hidden_state
        everywhere = plain(**inputs).last_hidden_state
        set_causal_sink(plain, True)  # plain transformers attends from the first token too; this is llm2emb's sink
        theirs = plain(**inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - everywhere).abs().max() > 1e-3


def test_load_weights_puts_a_saved_full_model_into_a_live_one(tiny_qwen2, tmp_path):
    trained = Embedder.from_pretrained(tiny_qwen2, pooling={"type": "latent_attention", "num_latents": 4,
                                                             "num_heads": 2}, torch_dtype=torch.float32)
    with torch.no_grad():
        for parameter in [*trained.backbone.parameters(), *trained.pooler.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.05)
    trained.save_pretrained(tmp_path / "trained")
    live = Embedder.from_pretrained(tiny_qwen2, pooling=trained.config.pooling, torch_dtype=torch.float32)
    first = next(live.backbone.parameters())
    assert not np.allclose(live.encode(TEXTS), trained.encode(TEXTS), atol=1e-4)
    live.load_weights(tmp_path / "trained")
    assert next(live.backbone.parameters()) is first  # in place: an optimizer's references stay valid
    np.testing.assert_allclose(live.encode(TEXTS), trained.encode(TEXTS), atol=1e-6)


def test_quantization_is_refused_in_one_line_without_a_gpu(tiny_qwen2):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    with pytest.raises(UserError, match=r"^quantization 4bit \(bitsandbytes\) needs a CUDA GPU"):
        Embedder.from_pretrained(tiny_qwen2, quantization="4bit")
    with pytest.raises(UserError, match="quantization must be one of"):
        Embedder.from_pretrained(tiny_qwen2, quantization="3bit")


def test_a_saved_folder_is_readable_by_whoever_may_read_its_directory(tiny_qwen2, tmp_path):
    """Atomic writes stage in mkstemp/mkdtemp files (0600/0700); a model folder served by another user (a
    container, a shared disk) must get the permissions any written file gets, not those."""
    import os
    import stat

    from llm2emb.files import current_umask, write_text_atomic
    from llm2emb.model.card import write_card

    old = os.umask(0o022)
    try:
        folder = Embedder.from_pretrained(tiny_qwen2, pooling="latent_attention").save_pretrained(tmp_path / "m")
        write_card(folder, Embedder.from_pretrained(folder).folder_config())
        write_text_atomic(tmp_path / "note.txt", "x")
        expected = 0o666 & ~current_umask()
        files = [path for path in folder.iterdir() if path.is_file()] + [tmp_path / "note.txt"]
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
        assert {"llm2emb.json", "README.md", "pooling.safetensors", "model.safetensors"} <= set(modes)
        assert all(mode == expected for mode in modes.values()), modes
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current_umask()
    finally:
        os.umask(old)
