"""The causal sink: in a bidirectional model every text's first token attends to itself alone (llm2emb.model.attention)."""

import json

import numpy as np
import pytest
import torch

from llm2emb import Embedder, UserError
from llm2emb.commands.export import export_sentence_transformers
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.backbone import VERIFIED_MODEL_TYPES, VerificationError, verify_attention
from llm2emb.model.config import CONFIG_NAME, EmbedderConfig

TEXTS = [
    "A man is playing a guitar on the street.",
    "The cat sat.",
    "Proteins fold into three-dimensional structures; enzymes catalyse reactions in the cell.",
]


def states(embedder: Embedder, texts, backend: str) -> list[torch.Tensor]:
    """Each text's last hidden states (tokens, d), through `backend`'s attention path."""
    embedder.set_attention_backend(backend)
    return [torch.from_numpy(h) for h in embedder.encode_tokens(texts, kind="document", normalize=False)]


@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_the_first_token_computes_what_the_causal_model_computes_and_the_rest_see_the_whole_text(tiny_models, arch,
                                                                                                 backend):
    sink = Embedder.from_pretrained(tiny_models[arch], torch_dtype=torch.float32, text_template="none")
    assert sink.config.causal_sink  # the default for a bidirectional base
    causal = Embedder.from_pretrained(tiny_models[arch], attention="causal", torch_dtype=torch.float32)
    plain = Embedder.from_pretrained(tiny_models[arch], torch_dtype=torch.float32, causal_sink=False)
    ours, theirs, everywhere = (states(m, TEXTS, backend) for m in (sink, causal, plain))
    for mine, causal_states, plain_states in zip(ours, theirs, everywhere):
        # Position 0 only ever attends to itself, in every layer: exactly the causal model's first state.
        torch.testing.assert_close(mine[0], causal_states[0], atol=1e-5, rtol=0)
        assert (mine[0] - plain_states[0]).abs().max() > 1e-3  # plain bidirectional lets it see the text
        assert (mine[1:] - causal_states[1:]).abs().max() > 1e-3  # and the rest is not causal
    # Every later token sees tokens after it: changing the last word moves position 1.
    changed = [TEXTS[0].rsplit(" ", 1)[0] + " violin."]
    moved = (states(sink, TEXTS[:1], backend)[0][1] - states(sink, changed, backend)[0][1]).abs().max()
    assert moved > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_and_packed_paths_agree_with_the_sink_on_either_padding_side(tiny_qwen2, side):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    embedder.config.padding_side = side
    vectors = {}
    for backend in ("padded", "packed"):
        embedder.set_attention_backend(backend)
        vectors[backend] = embedder.encode(TEXTS)
    np.testing.assert_allclose(vectors["padded"], vectors["packed"], atol=1e-5)
    alone = np.concatenate([embedder.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(alone, vectors["packed"], atol=1e-5)


def test_the_curriculum_at_weight_zero_is_the_causal_model(tiny_qwen2):
    sink = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32, text_template="none")
    causal = Embedder.from_pretrained(tiny_qwen2, attention="causal", torch_dtype=torch.float32)
    sink.set_future_attention(0.0)
    with torch.no_grad():
        torch.testing.assert_close(sink.forward(sink.tokenize(TEXTS)), causal.forward(causal.tokenize(TEXTS)),
                                   atol=1e-5, rtol=0)


def test_the_choice_is_saved_and_old_folders_load_without_it(tiny_qwen2, tmp_path):
    Embedder.from_pretrained(tiny_qwen2).save_pretrained(tmp_path / "sink")
    assert Embedder.from_pretrained(tmp_path / "sink").config.causal_sink
    with pytest.raises(UserError, match="built with causal_sink true; cannot load it with causal_sink false"):
        Embedder.from_pretrained(tmp_path / "sink", causal_sink=False)

    old = Embedder.from_pretrained(tiny_qwen2, causal_sink=False)
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / CONFIG_NAME
    raw = EmbedderConfig.load(tmp_path / "old")
    assert raw.causal_sink is False
    # A folder written before the key existed: the same file without it (and without the digests that cover it).
    fields = json.loads(path.read_text())
    for key in ("causal_sink", "digest", "file_digests"):
        fields.pop(key)
    path.write_text(json.dumps(fields))
    reloaded = Embedder.from_pretrained(tmp_path / "old")
    assert reloaded.config.causal_sink is False
    np.testing.assert_allclose(reloaded.encode(TEXTS), old.encode(TEXTS), atol=1e-6)


def test_refusals_are_one_line(tiny_qwen2, tmp_path):
    with pytest.raises(UserError, match="nothing to keep"):
        Embedder.from_pretrained(tiny_qwen2, attention="causal", causal_sink=True)
    with pytest.raises(UserError, match="attn_implementation='eager'"):
        Embedder.from_pretrained(tiny_qwen2, attn_implementation="eager")
    Embedder.from_pretrained(tiny_qwen2, attn_implementation="eager", causal_sink=False)  # plain bidirectional: fine
    Embedder.from_pretrained(tiny_qwen2).save_pretrained(tmp_path / "sink")
    with pytest.raises(UserError, match="export --format llm2emb"):
        export_sentence_transformers(tmp_path / "sink", tmp_path / "st")
    assert not (tmp_path / "st").exists()


def test_a_model_without_attention_layers_is_refused(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    for module in embedder.backbone.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            del module.is_causal  # an architecture whose attention modules llm2emb cannot find
    with pytest.raises(UserError, match="model_type 'qwen2': no attention layer found to keep the sink causal in"):
        set_causal_sink(embedder.backbone, True)


def test_the_load_check_catches_a_sink_that_is_not_in_effect(tiny_qwen2):
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32)
    verify_attention(embedder.backbone, "bidirectional", causal_sink=True)
    set_causal_sink(embedder.backbone, False)
    with pytest.raises(VerificationError, match="first token sees later ones"):
        verify_attention(embedder.backbone, "bidirectional", causal_sink=True)
