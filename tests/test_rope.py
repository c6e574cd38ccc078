"""RoPE extension (LongEmbed): the frequencies of each method, texts within the window untouched, longer texts
stretched, batches that never mix the two, and a folder that plain transformers loads with the same extension."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModel, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llm2emb import Embedder, UserError
from llm2emb.cli import main
from llm2emb.commands.convert import convert
from llm2emb.commands.info import describe
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.rope import long_factors, parse_rope_scaling

WINDOW = 32


@pytest.fixture(scope="module")
def short_window_base(tiny_qwen2, tmp_path_factory):
    """The tiny decoder with a trained window of 32 tokens (RoPE has no weights: only config.json changes)."""
    folder = tmp_path_factory.mktemp("rope") / "base"
    folder.mkdir()
    for item in tiny_qwen2.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = WINDOW
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def text_of(tokens: int) -> str:
    """A text of roughly `tokens` tokens for the tiny byte-level tokenizer."""
    return " ".join(f"w{i % 7}" for i in range(tokens // 2))


def test_the_spec_is_checked():
    assert parse_rope_scaling("yarn:4") == {"method": "yarn", "factor": 4.0}
    assert parse_rope_scaling({"method": "pi", "factor": 2}) == {"method": "pi", "factor": 2.0}
    for spec, message in [("yarn", "factor '' is not a number"), ("rope:2", "expected one of pi, ntk, yarn"),
                          ("pi:1", "factor must be above 1"), ("ntk:x", "factor 'x' is not a number")]:
        with pytest.raises(UserError, match=message):
            parse_rope_scaling(spec)


def test_each_method_divides_the_frequencies_as_its_paper_says():
    assert long_factors("pi", 4.0, 64, 1e4, 8192) == [4.0] * 32
    ntk = long_factors("ntk", 4.0, 64, 1e4, 8192)
    # theta -> theta * s^(d/(d-2)): frequency i = theta'^(-2i/d), so its divisor is s^(2i/(d-2))
    expected = [(1e4 * 4 ** (64 / 62)) ** (-2 * i / 64) for i in range(32)]
    got = [1e4 ** (-2 * i / 64) / divisor for i, divisor in enumerate(ntk)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert ntk[0] == 1.0 and math.isclose(ntk[-1], 4.0)
    # YaRN's frequencies: the same as transformers' own yarn (its attention temperature aside)
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, max_position_embeddings=8192)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0,
                              "original_max_position_embeddings": 8192}
    theirs, _ = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    plain = 1.0 / (1e5 ** (torch.arange(0, 64, 2).float() / 64))
    ours = plain / torch.tensor(long_factors("yarn", 4.0, 64, 1e5, 8192))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_only_texts_beyond_the_window_change(short_window_base, method):
    plain = Embedder.from_pretrained(short_window_base, torch_dtype=torch.float32)
    plain.config.max_length = 4 * WINDOW
    extended = Embedder.from_pretrained(short_window_base, torch_dtype=torch.float32, rope_scaling=f"{method}:4")
    extended.config.max_length = 4 * WINDOW
    assert extended.rope_window == WINDOW and plain.rope_window is None
    inside, beyond = text_of(20), text_of(90)
    assert len(extended.tokenize([inside])["input_ids"][0]) <= WINDOW < len(extended.tokenize([beyond])["input_ids"][0])
    np.testing.assert_array_equal(extended.encode([inside]), plain.encode([inside]))
    assert np.abs(extended.encode([beyond]) - plain.encode([beyond])).max() > 1e-5  # a random model uses positions little
    # a batch holding both gives each text the vector it gets alone (the batch is cut at the window)
    together = extended.encode([inside, beyond, text_of(10)], batch_size=8)
    alone = np.concatenate([extended.encode([t]) for t in (inside, beyond, text_of(10))])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_pi_puts_position_p_where_the_window_had_p_over_factor(short_window_base):
    extended = Embedder.from_pretrained(short_window_base, torch_dtype=torch.float32, rope_scaling="pi:4")
    rotary = extended.backbone.rotary_emb
    positions = torch.arange(0, 4 * WINDOW).unsqueeze(0)  # a forward beyond the window
    cos, sin = rotary(torch.zeros(1, 1, 64), positions)
    head_dim = 16
    theta = extended.backbone.config.rope_parameters["rope_theta"]
    angles = (positions[0].float() / 4)[:, None] * (theta ** (-torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(cos[0, :, : head_dim // 2], torch.cos(angles), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sin[0, :, : head_dim // 2], torch.sin(angles), rtol=1e-4, atol=1e-5)


def test_a_converted_folder_carries_the_extension_for_every_tool(short_window_base, tmp_path, capsys):
    assert main(["convert", "--base", str(short_window_base), "--out", str(tmp_path / "emb"), "--dtype", "float32",
                 "--max-length", "128", "--rope-scaling", "yarn:4"]) == 0
    assert f"RoPE yarn beyond {WINDOW} tokens" in capsys.readouterr().out
    config = json.loads((tmp_path / "emb" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope" and config["max_position_embeddings"] == 4 * WINDOW
    assert describe(tmp_path / "emb")["rope_scaling"] == "yarn x4"
    reloaded = Embedder.from_pretrained(tmp_path / "emb")
    assert reloaded.config.rope_scaling == {"method": "yarn", "factor": 4.0} and reloaded.rope_window == WINDOW
    batch = reloaded.tokenize([text_of(90)])
    assert batch["input_ids"].shape[1] > WINDOW
    plain_transformers = AutoModel.from_pretrained(tmp_path / "emb").eval()
    set_causal_sink(plain_transformers, True)  # the folder's causal sink (llm2emb.model.attention); the rest is config.json
    with torch.no_grad():
        theirs = plain_transformers(input_ids=batch["input_ids"]).last_hidden_state
        ours = reloaded.backbone(input_ids=batch["input_ids"]).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(UserError, match=r"saved with rope scaling .*yarn.*; cannot load it with .*pi"):
        Embedder.from_pretrained(tmp_path / "emb", rope_scaling="pi:2")
    plain_transformers.save_pretrained(tmp_path / "hf")  # a base that already has a stretched RoPE
    reloaded.tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="already uses RoPE type 'longrope'"):
        convert(str(tmp_path / "hf"), tmp_path / "again", rope_scaling="pi:2")


def test_a_bad_spec_is_one_line_from_the_cli(short_window_base, tmp_path, capsys):
    code = main(["convert", "--base", str(short_window_base), "--out", str(tmp_path / "x"), "--rope-scaling", "zoom:2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "expected one of pi, ntk, yarn" in err[0]
    assert not (tmp_path / "x").exists()
