"""The late-interaction head: Chamfer scores as MUVERA's exact ones, the head's vectors saved and reloaded, and the
refusals (a missing weights file, a head of another width, token vectors without a head)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.model.late_interaction import TOKEN_HEAD_WEIGHTS_NAME, TokenHead, chamfer_scores
from llm2emb.retrieval.muvera import chamfer

TEXTS = ["A man is playing a guitar on the street.", "The cat sat on the mat.", "Proteins fold."]


def test_chamfer_scores_equal_the_exact_chamfer_of_each_pair_over_its_real_tokens():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(20, 5, 8), dim=-1)  # 20 > one block of query rows
    documents = torch.nn.functional.normalize(torch.randn(6, 7, 8), dim=-1)
    query_mask = (torch.arange(5) < torch.randint(1, 6, (20, 1))).long()
    document_mask = (torch.arange(7) < torch.randint(1, 8, (6, 1))).long()
    scores = chamfer_scores(queries, query_mask, documents, document_mask)
    assert scores.shape == (20, 6)
    for i in range(20):
        q = queries[i][query_mask[i].bool()].numpy()
        for j in range(6):
            d = documents[j][document_mask[j].bool()].numpy()
            assert scores[i, j].item() == pytest.approx(chamfer(q, d) / len(q), abs=1e-5)


def test_a_document_without_tokens_scores_minus_infinity():
    vectors = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    scores = chamfer_scores(vectors, torch.ones(2, 3), vectors, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert torch.isfinite(scores[:, 0]).all() and torch.isneginf(scores[:, 1]).all()


def test_the_head_projects_to_unit_vectors_of_its_width():
    head = TokenHead(64, 16)
    out = head(torch.randn(2, 5, 64))
    assert out.shape == (2, 5, 16) and torch.allclose(out.norm(dim=-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="at least 1"):
        TokenHead(64, 0)


def test_a_model_with_a_head_saves_and_reloads_its_token_vectors(tiny_qwen2, tmp_path):
    model = Embedder.from_pretrained(tiny_qwen2)
    plain = model.encode_tokens(TEXTS)
    assert plain[0].shape[1] == 64  # no head: the hidden states as they are
    torch.manual_seed(1)
    head = model.add_token_head(16)
    assert model.add_token_head(16) is head and model.config.token_dim == 16
    live = model.encode_tokens(TEXTS)
    assert [v.shape for v in live] == [(len(p), 16) for p in plain]  # one vector per pooled token, 16 wide
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / TOKEN_HEAD_WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "m" / "llm2emb.json").read_text())["token_dim"] == 16
    reloaded = Embedder.from_pretrained(tmp_path / "m")
    for a, b in zip(live, reloaded.encode_tokens(TEXTS)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(UserError, match="16-dimensional; it cannot become 8-dimensional"):
        reloaded.add_token_head(8)
    (tmp_path / "m" / TOKEN_HEAD_WEIGHTS_NAME).unlink()
    with pytest.raises(UserError, match=f"16-dimensional late-interaction head but {TOKEN_HEAD_WEIGHTS_NAME} is missing"):
        Embedder.from_pretrained(tmp_path / "m")


def test_token_vectors_in_training_need_a_head(tiny_qwen2):
    model = Embedder.from_pretrained(tiny_qwen2)
    batch = dict(model.tokenize(TEXTS))
    with pytest.raises(UserError, match="need the model's token head"):
        model(batch, with_tokens=True)
    model.add_token_head(8)
    pooled, tokens, mask = model(batch, with_tokens=True)
    assert pooled.shape == (3, 64) and tokens.shape[:2] == mask.shape and tokens.shape[2] == 8
    assert torch.equal(mask, batch["pool_mask"])
    with pytest.raises(ValueError, match="it takes no pool_rows"):  # chunk rows would not line up with token rows
        model({**batch, "pool_rows": torch.arange(3)}, with_tokens=True)


def test_packing_refuses_shapes_it_cannot_hold():
    from llm2emb.train.late_loss import LateInteractionTerm, pack

    with pytest.raises(ValueError, match="5 tokens do not fit a packed width of 4"):
        pack(torch.zeros(2, 6), torch.zeros(2, 5, 3), torch.ones(2, 5), width=4)
    with pytest.raises(ValueError, match="a packed width of 11 does not hold 6 pooled dims and tokens of 3"):
        LateInteractionTerm(6, 3).unpack(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="a positive weight"):
        LateInteractionTerm(6, 3, weight=0)
