"""Bidirectionality per verified architecture and attention implementation, and the load-time check."""

import pytest
import torch
from transformers import AutoModel

from llm2emb.errors import UserError, VerificationError
from llm2emb.model.backbone import (
    VERIFIED_MODEL_TYPES,
    BaseRef,
    load_backbone,
    resolve_base,
    verify_attention,
)


def first_position_moves(model) -> float:
    """How much position 0 changes when only the last token changes."""
    ids = torch.tensor([[50, 60, 70, 80, 90, 100], [50, 60, 70, 80, 90, 300]])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    return (hidden[0, 0] - hidden[1, 0]).abs().max().item()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
def test_bidirectional_and_causal_per_architecture(tiny_models, arch, implementation):
    base = BaseRef(str(tiny_models[arch]))
    bidirectional = load_backbone(base, "bidirectional", torch.float32, implementation)
    causal = load_backbone(base, "causal", torch.float32, implementation)
    assert bidirectional.config._attn_implementation == implementation
    assert first_position_moves(bidirectional) > 1e-4
    assert first_position_moves(causal) == 0.0
    verify_attention(bidirectional, "bidirectional")
    verify_attention(causal, "causal")


def test_mistral_sliding_window_is_cleared(tiny_models):
    model = load_backbone(BaseRef(str(tiny_models["mistral"])), "bidirectional", torch.float32)
    assert model.config.sliding_window is None


def test_verification_refuses_a_model_that_stayed_causal(tiny_qwen2):
    causal = load_backbone(BaseRef(str(tiny_qwen2)), "causal", torch.float32)
    # a verified type honours the flag: a first position blind to later tokens points at the weights first
    with pytest.raises(VerificationError, match=r"'qwen2': the first position ignored .* weights are likely degenerate"):
        verify_attention(causal, "bidirectional")
    causal.config.model_type = "unverified"  # a type never checked: its attention is the suspect
    with pytest.raises(VerificationError, match=r"'unverified' stayed causal with is_causal=False"):
        verify_attention(causal, "bidirectional")


def test_verification_refuses_a_causal_request_that_leaks(tiny_qwen2):
    bidirectional = load_backbone(BaseRef(str(tiny_qwen2)), "bidirectional", torch.float32)
    with pytest.raises(VerificationError, match="leaks future tokens"):
        verify_attention(bidirectional, "causal")


def test_verification_refuses_padding_leaks(tiny_qwen2):
    """A model that ignores the attention mask must be refused."""
    model = load_backbone(BaseRef(str(tiny_qwen2)), "bidirectional", torch.float32)
    forward = model.forward
    model.forward = lambda input_ids, attention_mask=None, **kw: forward(input_ids=input_ids, **kw)
    with pytest.raises(VerificationError, match="leaks padding"):
        verify_attention(model, "bidirectional")


def test_converted_config_reloads_bidirectional_with_plain_automodel(tiny_qwen2, tmp_path):
    model = load_backbone(BaseRef(str(tiny_qwen2)), "bidirectional", torch.float32)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.config.is_causal is False
    assert first_position_moves(reloaded) > 1e-4


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("./missing-folder", "no such file or folder"),
        ("missing.gguf", "GGUF file not found"),
    ],
)
def test_resolve_base_errors(reference, message):
    with pytest.raises(UserError, match=message):
        resolve_base(reference)


def test_resolve_base_refuses_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_base(tmp_path)


@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
def test_backbone_builds_no_kv_cache(tiny_models, arch):
    """A cache would copy every layer's keys and values on each forward and keep them all alive until its end."""
    model = load_backbone(BaseRef(str(tiny_models[arch])), "bidirectional", torch.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[50, 60, 70, 80]]))
    assert out.past_key_values is None
