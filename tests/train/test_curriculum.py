"""The soft causal-to-bidirectional curriculum: weight 0 is the causal model, 1 the bidirectional one, and in between
the attention to later tokens is scaled; a training stage anneals it and leaves a plainly bidirectional model."""

import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError

TEXTS = ["A man is playing a guitar.", "The cat sat on the mat and looked at the dog.", "Proteins fold."]


@pytest.fixture(scope="module")
def models(tiny_qwen2):
    bidirectional = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32).eval()
    causal = Embedder.from_pretrained(tiny_qwen2, pooling="mean", attention="causal", torch_dtype=torch.float32).eval()
    return bidirectional, causal


@torch.no_grad()
def test_weight_zero_is_causal_one_is_bidirectional_and_between_is_neither(models):
    bidirectional, causal = models
    batch = bidirectional.tokenize(TEXTS, "Find a paraphrase")  # padded rows: the bias must respect padding
    want_bi, want_causal = bidirectional(batch), causal(batch)
    assert (want_bi - want_causal).abs().max() > 1e-3
    try:
        bidirectional.set_future_attention(0.0)
        torch.testing.assert_close(bidirectional(batch), want_causal, rtol=0, atol=1e-5)
        bidirectional.set_future_attention(0.5)
        half = bidirectional(batch)
        assert (half - want_causal).abs().max() > 1e-4 and (half - want_bi).abs().max() > 1e-4
    finally:
        bidirectional.set_future_attention(1.0)
    torch.testing.assert_close(bidirectional(batch), want_bi, rtol=0, atol=1e-6)


def test_weight_outside_unit_interval_and_causal_models_are_refused(models):
    bidirectional, causal = models
    with pytest.raises(UserError, match="between 0 and 1"):
        bidirectional.set_future_attention(1.5)
    with pytest.raises(UserError, match="needs a bidirectional model"):
        causal.set_future_attention(0.0)


def test_a_stage_anneals_the_weight_and_saves_a_bidirectional_model(tiny_qwen2, tmp_path):
    import json
    import textwrap

    from transformers import TrainerCallback

    from llm2emb.train.runner import train

    rows = [{"query": f"q{i} on the mat?", "positive": f"A cat {i} is on the mat.", "negative": f"A dog {i} runs."}
            for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{base: {tiny_qwen2}, max_length: 32, dtype: float32}}
        lora: null
        output_dir: {tmp_path / 'run'}
        report_to: []
        stages:
          - {{name: warm, max_steps: 4, batch_size: 4, hard_negatives: 1, bidirectional_warmup: 3,
              learning_rate: 1.0e-3, datasets: [{{path: rows.jsonl}}]}}
    """))
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.future_attention)

    train(recipe, callbacks=[Record()])
    assert seen == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    saved = Embedder.from_pretrained(tmp_path / "run" / "model")  # the load check verifies bidirectional attention
    assert saved.config.attention == "bidirectional" and saved.future_attention == 1.0


def test_the_curriculum_is_refused_on_packed_batches_and_for_a_causal_recipe(models, tiny_qwen2, tmp_path):
    from llm2emb.train.recipe_file import load_recipe

    bidirectional, _ = models
    batch = bidirectional.tokenize(TEXTS)
    bidirectional.set_attention_backend("packed")
    try:
        bidirectional.set_future_attention(0.5)
        with pytest.raises(UserError, match="curriculum runs on padded batches"):
            bidirectional(batch)
    finally:
        bidirectional.set_future_attention(1.0)
        bidirectional.set_attention_backend("auto")
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "rows.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    recipe.write_text(f"model: {{base: {tiny_qwen2}, attention: causal}}\noutput_dir: run\n"
                      "stages: [{name: s, max_steps: 1, bidirectional_warmup: 5, datasets: [{path: rows.jsonl}]}]\n")
    with pytest.raises(UserError, match=r"stages\[0\]\.bidirectional_warmup: the causal-to-bidirectional curriculum "
                                        r"needs model.attention: bidirectional"):
        load_recipe(recipe)
