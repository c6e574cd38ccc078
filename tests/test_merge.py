"""`llm2emb merge`: the merged adapter applies exactly the weighted sum of the deltas; a model merged with itself
is itself; models of different setups are refused in one line."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from llm2emb.cli import main
from llm2emb.commands.merge import merge, parse_weights
from llm2emb.errors import UserError
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.embedder import Embedder

TEXTS = ["A man is playing a guitar.", "The cat sat on the mat.", "Paris is the capital of France."]
POOLING = {"type": "latent_attention", "num_latents": 4, "num_heads": 2}


def trained_folder(base, directory, seed: int, r: int, pooling=POOLING, token_dim: int | None = None):
    """An adapter folder with random (non-zero) LoRA and pooler weights (and a late-interaction head of `token_dim`),
    as a training run would leave it."""
    torch.manual_seed(seed)
    embedder = Embedder.from_pretrained(base, pooling=pooling)
    if token_dim is not None:
        embedder.add_token_head(token_dim)
    lora = LoraConfig(r=r, lora_alpha=2 * r + seed, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False)
    embedder.backbone = get_peft_model(embedder.backbone, lora)
    return embedder.save_pretrained(directory)


@pytest.fixture(scope="module")
def folders(tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return [trained_folder(tiny_qwen2, root / "a", seed=1, r=4), trained_folder(tiny_qwen2, root / "b", seed=2, r=8)]


def deltas(folder) -> dict[str, torch.Tensor]:
    """delta W = scaling * B @ A of every LoRA module of a saved adapter."""
    backbone = Embedder.from_pretrained(folder).backbone
    return {name: module.get_delta_weight("default") for name, module in backbone.named_modules()
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})}


def test_merged_adapter_is_the_weighted_sum_of_deltas_exactly(tiny_qwen2, folders, tmp_path):
    out = merge(folders, tmp_path / "merged", weights=[0.25, 0.75])
    got, first, second = deltas(out), deltas(folders[0]), deltas(folders[1])
    assert got.keys() == first.keys() and len(got) == 6
    for name in got:
        torch.testing.assert_close(got[name], 0.25 * first[name] + 0.75 * second[name], rtol=1e-5, atol=1e-7)

    # The merged model's hidden states equal the base with the averaged deltas added to its weights.
    merged = Embedder.from_pretrained(out)
    manual = AutoModel.from_pretrained(tiny_qwen2)
    manual.config.is_causal = False
    set_causal_sink(manual, True)
    with torch.no_grad():
        for name in got:
            module = manual.get_submodule(name.split("base_model.model.", 1)[1])
            module.weight += 0.25 * first[name] + 0.75 * second[name]
    batch = merged.tokenize(TEXTS)
    with torch.no_grad():
        want = manual(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        have = merged.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(have, Embedder.from_pretrained(folders[0]).backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.detach(), atol=1e-3)

    pooled = {k: 0.25 * a + 0.75 * b for (k, a), b in zip(
        Embedder.from_pretrained(folders[0]).pooler.state_dict().items(),
        Embedder.from_pretrained(folders[1]).pooler.state_dict().values())}
    for key, value in merged.pooler.state_dict().items():
        torch.testing.assert_close(value, pooled[key])


def test_merging_a_model_with_itself_gives_the_model(folders, tmp_path):
    out = merge([folders[0], folders[0]], tmp_path / "self")
    want = Embedder.from_pretrained(folders[0]).encode(TEXTS)
    got = Embedder.from_pretrained(out).encode(TEXTS)
    assert abs(got - want).max() < 1e-5


def test_late_interaction_heads_are_averaged_and_must_agree(tiny_qwen2, folders, tmp_path, capsys):
    heads = [trained_folder(tiny_qwen2, tmp_path / name, seed=seed, r=4, token_dim=8)
             for name, seed in (("a", 5), ("b", 6))]
    merged = Embedder.from_pretrained(merge(heads, tmp_path / "merged", weights=[0.25, 0.75]))
    first, second = (Embedder.from_pretrained(h).token_head.projection.weight for h in heads)
    torch.testing.assert_close(merged.token_head.projection.weight, 0.25 * first + 0.75 * second)
    capsys.readouterr()
    assert main(["merge", str(heads[0]), str(folders[0]), "--out", str(tmp_path / "out")]) == 2
    assert "token_dim None differs" in capsys.readouterr().err  # the model without a head, named against the first


def test_parse_weights():
    assert parse_weights("1,3", 2) == [0.25, 0.75]
    assert parse_weights(None, 4) == [0.25] * 4
    for text, message in (("1", "1 weights for 2"), ("a,b", "comma-separated"), ("1,-1", "positive")):
        with pytest.raises(UserError, match=message):
            parse_weights(text, 2)


def test_different_setups_are_refused_in_one_line(tiny_qwen2, tiny_models, folders, tmp_path, capsys):
    mean = trained_folder(tiny_qwen2, tmp_path / "mean", seed=3, r=4, pooling="mean")
    other_base = trained_folder(tiny_models["llama"], tmp_path / "llama", seed=3, r=4)
    cases = [
        ([str(folders[0]), str(mean)], "pooling"),
        ([str(folders[0]), str(other_base)], "merge needs one base"),
        ([str(folders[0])], "at least two"),
        ([str(folders[0]), str(tmp_path)], "not an llm2emb model folder"),
        ([str(folders[0]), str(folders[1]), "--weights", "1,2,3"], "3 weights for 2 models"),
    ]
    capsys.readouterr()
    for args, message in cases:
        code = main(["merge", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_merge_cli_writes_a_loadable_folder(folders, tmp_path, capsys):
    assert main(["merge", str(folders[0]), str(folders[1]), "--weights", "1,1", "--out", str(tmp_path / "m")]) == 0
    assert "merged 2 models" in capsys.readouterr().out
    assert Embedder.from_pretrained(tmp_path / "m").encode(TEXTS).shape == (3, 64)
