"""The text template: every text, query or document, wrapped (e.g. in the base's chat template), never pooled."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from llm2emb import Embedder, UserError
from llm2emb.commands.export import export_sentence_transformers
from llm2emb.model.config import CONFIG_NAME
from llm2emb.model.prompts import Prompts, default_text_template, text_template_for
from tests.conftest import save_tiny_model

CHAT = "{% for m in messages %}<|endoftext|>user said: {{ m['content'] }}\nend\n{% endfor %}"
TEXTS = ["A man is playing a guitar on the street.", "The cat sat."]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A tiny decoder whose tokenizer has a chat template, as instruct bases do."""
    folder = save_tiny_model(tmp_path_factory.mktemp("chat") / "base")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    return folder


def test_the_template_wraps_queries_and_documents_and_the_text_span_moves_with_it():
    prompts = Prompts("Instruct: {instruction}\nQuery: {text}", "{text}", "<turn>{text}</turn>")
    query = prompts.query("cats", "find pets")
    assert query.string == "<turn>Instruct: find pets\nQuery: cats</turn>"
    assert query.string[query.text_start:query.text_end] == "cats"
    document = prompts.document("dogs")
    assert document.string == "<turn>dogs</turn>" and document.string[document.text_start:document.text_end] == "dogs"
    assert prompts.query("cats").string == "<turn>cats</turn>"  # no instruction: still wrapped
    for bad in ("no placeholder", "{text} and {text}", "{instruction}: {text}"):
        with pytest.raises(UserError, match="must hold {text} exactly once"):
            Prompts("{text}", "{text}", bad).query("x")


def test_chat_renders_the_tokenizers_template_around_one_user_turn(chat_base):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    assert text_template_for("chat", tokenizer) == "<|endoftext|>user said: {text}\nend\n"
    assert text_template_for("none", tokenizer) == "{text}"
    assert text_template_for("[{text}]", tokenizer) == "[{text}]"
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        text_template_for("chat", tokenizer)


CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
INST = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


def test_turn_keeps_the_user_turn_and_drops_a_default_system_prompt(tmp_path):
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]})
    tokenizer.chat_template = CHATML  # SmolLM2 / Qwen: ChatML with a system turn of its own
    assert text_template_for("chat", tokenizer) == "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
    assert text_template_for("turn", tokenizer) == "<|im_start|>user\n{text}<|im_end|>\n"
    tokenizer.chat_template = INST  # Mistral: no system turn, and the BOS the template writes is not doubled
    assert text_template_for("turn", tokenizer) == text_template_for("chat", tokenizer) == "<|endoftext|>[INST] {text} [/INST]"


def test_bos_leads_with_one_special_token_where_the_tokenizer_adds_none(chat_base):
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    assert text_template_for("bos", tokenizer) == "<|endoftext|>{text}"  # SmolLM2: a BOS its tokenizer never adds
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.bos_token = None
    tokenizer.chat_template = CHATML  # Qwen: no BOS at all; its chat template opens with <|im_start|>
    assert text_template_for("bos", tokenizer) == "<|im_start|>{text}"
    tokenizer.chat_template = "{{ raise_exception('only system turns') }}"  # cannot render a user turn
    with pytest.raises(UserError, match="no BOS token and no chat template"):
        text_template_for("bos", tokenizer)
    for choice in ("chat", "turn"):
        with pytest.raises(UserError, match=f"text template {choice}: the base's chat template cannot render one user"):
            text_template_for(choice, tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no BOS token and no chat template"):
        text_template_for("bos", tokenizer)
    with pytest.raises(UserError, match="--text-template none"):  # the default is refused, not silently another
        default_text_template(tokenizer, causal_sink=True)
    assert default_text_template(tokenizer, causal_sink=False) == "{text}"  # plain mask: servable elsewhere
    assert default_text_template(build_tokenizer(), causal_sink=False) == "{text}"
    adds = build_tokenizer()  # Llama, Mistral: the tokenizer writes its BOS itself, and special tokens are not pooled
    bos_id = adds.convert_tokens_to_ids("<|endoftext|>")
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)])
    assert adds("x")["input_ids"][0] == bos_id and text_template_for("bos", adds) == "{text}"
    led = Embedder.from_pretrained(chat_base, torch_dtype=torch.float32, text_template="bos")
    plain = Embedder.from_pretrained(chat_base, torch_dtype=torch.float32, text_template="none")
    batch = led.tokenize(["The cat sat."], kind="document")
    ids, pool = batch["input_ids"][0].tolist(), batch["pool_mask"][0].tolist()
    text_ids = plain.tokenize(["The cat sat."], kind="document")["input_ids"][0].tolist()
    assert ids[0] == bos_id and not pool[0] and [i for i, p in zip(ids, pool) if p] == text_ids


def test_a_wrapped_folder_pools_the_text_alone_keeps_its_template_and_refuses_another(chat_base, tmp_path):
    assert Embedder.from_pretrained(chat_base).config.text_template == "<|endoftext|>{text}"  # the default: bos
    plain = Embedder.from_pretrained(chat_base, torch_dtype=torch.float32, text_template="none")
    chat = Embedder.from_pretrained(chat_base, torch_dtype=torch.float32, text_template="chat")
    batch = chat.tokenize(["The cat sat."], kind="document")
    ids, pool = batch["input_ids"][0].tolist(), batch["pool_mask"][0].tolist()
    text_ids = plain.tokenize(["The cat sat."], kind="document")["input_ids"][0].tolist()
    assert len(ids) > len(text_ids) and [i for i, p in zip(ids, pool) if p] == text_ids  # template: context only
    wrapped, bare = chat.encode(TEXTS), plain.encode(TEXTS)
    assert np.all(np.abs((wrapped * bare).sum(axis=1)) < 0.9999)  # the template's tokens change the text's states
    folder = chat.save_pretrained(tmp_path / "chat")
    again = Embedder.from_pretrained(folder)
    assert again.config.text_template == chat.config.text_template
    np.testing.assert_allclose(again.encode(TEXTS), wrapped, atol=1e-5)
    with pytest.raises(UserError, match="built with text template"):
        Embedder.from_pretrained(folder, text_template="none")
    portable = Embedder.from_pretrained(chat_base, text_template="chat", causal_sink=False)
    with pytest.raises(UserError, match="sentence-transformers would pool"):
        export_sentence_transformers(portable.save_pretrained(tmp_path / "no-sink"), tmp_path / "st")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "text_template": "<{text}>"}))
    with pytest.raises(UserError, match="digest does not match"):  # an edited template is refused
        Embedder.from_pretrained(folder)


def test_folders_written_before_the_template_still_load_as_the_text_alone(chat_base, tmp_path):
    folder = Embedder.from_pretrained(chat_base, torch_dtype=torch.float32, text_template="none").save_pretrained(
        tmp_path / "old")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["text_template"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert Embedder.from_pretrained(folder).config.text_template == "{text}"


def test_convert_writes_the_template_and_names_what_is_missing(chat_base, tmp_path):
    def convert(*extra):
        return subprocess.run([sys.executable, "-m", "llm2emb.cli", "convert", "--base", str(chat_base), "--out",
                               str(tmp_path / extra[-1]), "--text-template", *extra[:-1]],
                              capture_output=True, text=True)

    done = convert("chat", "wrapped")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "wrapped" / CONFIG_NAME).read_text())["text_template"].startswith("<|endoftext|>user")
    refused = convert("[text]", "bad")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "text template '[text]' must hold {text} exactly once" in refused.stderr
