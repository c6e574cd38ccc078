"""`train()` end to end on a tiny converted model: outputs, loading with plain PEFT, resume, NaN stop, refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, TrainerCallback

from llm2emb.commands.convert import convert
from llm2emb.errors import UserError
from llm2emb.model import folder as model_folder
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.embedder import Embedder
from llm2emb.train.callbacks import Evaluator
from llm2emb.train.errors import NonFiniteLossError
from llm2emb.train.recipe import RESOLVED_NAME
from llm2emb.train.recipe_file import load_recipe
from llm2emb.train.runner import check_recipe, train

SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital"]
PLACES = ["street", "kitchen", "mat", "garden"]

RECIPE = """\
    model:
      base: emb
      max_length: 32
    lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj]}
    output_dir: OUT
    logging_steps: 1
    save_steps: 1
    eval:
      every_steps: 2
      sts: [{path: sts.tsv}]
      beir: [{path: beir, instruction: Find the sentence, corpus_sample: 36}]
    stages:
      - name: retrieval
        max_steps: 3
        batch_size: 4
        gradcache_chunk: 2
        learning_rate: 5.0e-3
        temperature: 0.1
        hard_negatives: 1
        datasets: [{path: triplets.jsonl, instruction: Find the sentence}]
      - name: blend
        datasets: [{path: triplets.jsonl, in_batch_negatives: false}]
"""


def write_workspace(directory: Path, base: Path) -> Path:
    """Data, evaluation files and a two-stage recipe in `directory`; returns the recipe's path."""
    pairs = [(s, p) for s in SUBJECTS for p in PLACES]
    rows = [{"query": f"{s} on the {p}?", "positive": f"A {s} is on the {p}.", "negative": f"A {s} is far from the {p}."}
            for s, p in pairs]
    (directory / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "sts.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{i % 5}\tA {s} is on the {p}.\tA {s} sits by the {p}.\n" for i, (s, p) in enumerate(pairs)))
    beir = directory / "beir"
    (beir / "qrels").mkdir(parents=True)
    distractors = [{"_id": f"x{i}", "text": f"Nothing is on the {p} number {i}."} for i, p in enumerate(PLACES * 2)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in distractors) + "".join(
        json.dumps({"_id": f"d{i}", "text": f"A {s} is on the {p}."}) + "\n" for i, (s, p) in enumerate(pairs)))
    (beir / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"{s} on the {p}?"}) + "\n" for i, (s, p) in enumerate(pairs)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(pairs))))
    (directory / "emb").symlink_to(base)
    path = directory / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE).replace("OUT", str(directory / "run")))
    return path


@pytest.fixture(scope="module")
def converted(tiny_qwen2, tmp_path_factory) -> Path:
    """The bidirectional base folder (`llm2emb convert`) with a trainable pooler; plain PEFT loads adapters onto it."""
    out = tmp_path_factory.mktemp("runner") / "converted"
    convert(str(tiny_qwen2), out, pooling={"type": "latent_attention", "num_latents": 4, "num_heads": 2}, dtype="float32")
    return out


@pytest.fixture(scope="module")
def finished(converted, tmp_path_factory):
    """One uninterrupted two-stage run, shared by the tests that read its outputs."""
    recipe = write_workspace(tmp_path_factory.mktemp("finished"), converted)
    return recipe, train(recipe)


def trained_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(model_dir / "adapter_model.safetensors")),
            **{f"pooler.{k}": v for k, v in load_file(str(model_dir / "pooling.safetensors")).items()}}


def test_run_writes_model_metrics_summary_and_plot(finished):
    recipe, summary = finished
    root = recipe.parent / "run"
    assert summary.steps == 6 and [s["steps"] for s in summary.stages] == [3, 3]
    assert summary.tokens > 0 and summary.peak_memory_mb > 0
    saved = json.loads((root / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["tokens_per_second"] > 0
    assert [e["stage"] for e in saved["evaluations"]] == ["start", "end"]
    resolved = load_recipe(root / RESOLVED_NAME)  # the resolved recipe is itself a valid recipe
    assert resolved.stages[1].temperature == 0.1 and resolved.stages[1].datasets[0].in_batch_negatives is False
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["stage"], r["step"]) for r in records if "loss" in r]
    assert losses == [(stage, step) for stage in ("retrieval", "blend") for step in (1, 2, 3)]
    evals = [(r["stage"], r["step"]) for r in records if any(k.startswith("eval/") for k in r)]
    assert evals == [("start", 0), ("retrieval", 2), ("blend", 2), ("end", 6)]
    assert any(k.endswith("/ndcg@10") for r in records for k in r)
    assert (root / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("0-retrieval", "1-blend"):
        assert (root / "stages" / stage / "final" / "llm2emb.json").is_file()


def test_the_model_card_is_generated_from_what_the_run_recorded(finished):
    recipe, summary = finished
    root = recipe.parent / "run"
    card = (root / "model" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["pipeline_tag"] == "sentence-similarity" and "causal-sink" in meta["tags"]
    assert "base_model" not in meta  # a local tiny base: no hub id to name
    end = json.loads((root / "summary.json").read_text())["evaluations"][-1]
    results = meta["model-index"][0]["results"]
    reported = {(r["dataset"]["name"], r["metrics"][0]["type"]): r["metrics"][0]["value"] for r in results}
    assert reported == {tuple(k[len("eval/"):].rsplit("/", 1)): v for k, v in end.items() if k.startswith("eval/")}
    assert len(reported) == 2
    rows = len((recipe.parent / "triplets.jsonl").read_text().splitlines())
    assert f"| retrieval | `{recipe.parent / 'triplets.jsonl'}` | {rows:,} |" in card
    assert (root / RESOLVED_NAME).read_text().rstrip("\n") in card
    assert f"llm2emb eval MODEL --sts {recipe.parent / 'sts.tsv'}" in card
    assert "set_causal_sink(model, True)" in card and "PeftModel.from_pretrained" in card


def test_stages_chain_and_model_loads_with_embedder_and_plain_peft(finished, converted):
    recipe, summary = finished
    model_dir = Path(summary.model_dir)
    first, last = (trained_weights(recipe.parent / "run" / "stages" / s / "final") for s in ("0-retrieval", "1-blend"))
    assert trained_weights(model_dir).keys() == last.keys()
    assert all(torch.equal(trained_weights(model_dir)[k], v) for k, v in last.items())
    assert any(not torch.equal(first[k], last[k]) for k in first)  # stage 2 trained on top of stage 1

    embedder = Embedder.from_pretrained(model_dir).eval()
    assert embedder.pooler.trainable and embedder.config.max_length == 32
    batch = embedder.tokenize(["A cat is on the mat.", "enzyme on the street?"])
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(converted), model_dir).eval()
    set_causal_sink(plain, True)  # the converted base's causal sink (llm2emb.model.attention)
    with torch.no_grad():
        ours = embedder.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-5)
    base = AutoModel.from_pretrained(converted).eval()
    set_causal_sink(base, True)
    with torch.no_grad():
        untrained = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (untrained - ours.last_hidden_state).abs().max() > 1e-3  # the adapter is really applied


class Interrupt(Exception):
    """Stands for a killed job."""


class InterruptAt(TrainerCallback):
    def __init__(self, stage_dir: str, step: int):
        self.stage_dir, self.step = stage_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.stage_dir) and state.global_step == self.step:
            raise Interrupt


def test_resume_after_interrupt_ends_with_the_same_weights(finished, converted, tmp_path):
    recipe = write_workspace(tmp_path, converted)
    with pytest.raises(Interrupt):
        train(recipe, callbacks=[InterruptAt("1-blend", step=2)])  # checkpoint-1 of stage 2 is on disk
    assert not (tmp_path / "run" / "model").exists()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(recipe)
    summary = train(recipe, resume=True)
    assert [(s["name"], s["steps"]) for s in summary.stages] == [("blend", 2)]  # stage 1 skipped, stage 2 resumed
    want, got = trained_weights(Path(finished[1].model_dir)), trained_weights(tmp_path / "run" / "model")
    assert want.keys() == got.keys()
    for name in want:  # a wrong data position, RNG state or stage start moves some weight by ~lr (5e-3)
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4, msg=name)


def late_interaction_workspace(directory: Path, base: Path) -> Path:
    """The two-stage workspace whose second stage also trains an 8-dimensional token head."""
    recipe = write_workspace(directory, base)
    text = recipe.read_text()
    assert "  - name: blend\n" in text
    recipe.write_text(text.replace("  - name: blend\n", "  - name: blend\n    late_interaction: {dim: 8}\n"))
    return recipe


def head_weights(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "token_head.safetensors"))["projection.weight"]


def test_a_late_interaction_stage_trains_the_head_it_saves_and_resumes(converted, tmp_path):
    (tmp_path / "whole").mkdir()
    whole = late_interaction_workspace(tmp_path / "whole", converted)
    summary = train(whole)
    stages = tmp_path / "whole" / "run" / "stages"
    untouched, trained = head_weights(stages / "0-retrieval" / "final"), head_weights(stages / "1-blend" / "final")
    assert not torch.equal(untouched, trained)  # frozen in the first stage, trained by the second
    assert (stages / "1-blend" / "checkpoint-2" / "token_head.safetensors").is_file()
    model = Embedder.from_pretrained(summary.model_dir)
    assert model.config.token_dim == 8 and model.encode_tokens(["A cat is on the mat."])[0].shape[1] == 8

    (tmp_path / "cut").mkdir()
    cut = late_interaction_workspace(tmp_path / "cut", converted)
    with pytest.raises(Interrupt):
        train(cut, callbacks=[InterruptAt("1-blend", step=2)])
    train(cut, resume=True)  # the first stage is skipped: its head comes back from its final folder
    torch.testing.assert_close(head_weights(tmp_path / "cut" / "run" / "model"), head_weights(Path(summary.model_dir)),
                               rtol=1e-3, atol=1e-4)


def test_a_base_whose_head_has_another_width_is_refused_before_any_step(converted, tmp_path):
    headed = Embedder.from_pretrained(converted)
    headed.add_token_head(16)
    headed.save_pretrained(tmp_path / "headed")
    (tmp_path / "work").mkdir()
    recipe = late_interaction_workspace(tmp_path / "work", tmp_path / "headed")
    with pytest.raises(UserError, match=r"stages\[1\]\.late_interaction\.dim: the model's late-interaction head is "
                                        r"16-dimensional; it cannot become 8-dimensional \(.*headed has one\)"):
        train(recipe)
    assert not (tmp_path / "work" / "run").exists()


def test_resume_refuses_a_changed_recipe(finished):
    recipe, _ = finished
    with pytest.raises(UserError, match=r"recipe changed since this run started \(stages\[1\]\.max_steps\)"):
        train(recipe, overrides=["stages[1].max_steps=4"], resume=True)


class PoisonAdapterBefore(TrainerCallback):
    """Writes NaN into a LoRA weight before step `step` (a real non-finite state, not a mocked loss)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(converted, tmp_path):
    recipe = write_workspace(tmp_path, converted)
    with pytest.raises(NonFiniteLossError) as caught:
        train(recipe, callbacks=[PoisonAdapterBefore(step=3)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stages[0] (retrieval) step 3: the loss became nan; stopped before the optimizer step")
    stage_dir = tmp_path / "run" / "stages" / "0-retrieval"
    assert f"{stage_dir / 'checkpoint-2'}" in message
    assert sorted(p.name for p in stage_dir.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert all(v.isfinite().all() for v in trained_weights(stage_dir / "checkpoint-2").values())
    assert not (tmp_path / "run" / "model").exists()


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(converted, tmp_path, monkeypatch, capsys):
    """A disk that fills while checkpoint 2 is written: the message safetensors gives (seen on this machine), one
    line from the CLI naming the checkpoint and the intact one before it, no half checkpoint, and --resume works."""
    from safetensors import SafetensorError

    from llm2emb.cli import EXIT_USAGE, main

    recipe = write_workspace(tmp_path, converted)
    write = model_folder.write_folder

    def fill_disk(embedder, folder, state_dict):
        if "checkpoint-2" in str(folder):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        write(embedder, folder, state_dict)

    monkeypatch.setattr(model_folder, "write_folder", fill_disk)
    assert main(["train", str(recipe)]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    stage_dir = tmp_path / "run" / "stages" / "0-retrieval"
    assert lines[-1] == (f"llm2emb train: error: {stage_dir / 'checkpoint-2'}: no space left on device while writing "
                         f"this checkpoint; the last checkpoint {stage_dir / 'checkpoint-1'} is intact: free some "
                         "space and continue with --resume")
    assert not any("Traceback" in line for line in lines)
    assert sorted(p.name for p in stage_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    monkeypatch.setattr(model_folder, "write_folder", write)
    summary = train(recipe, resume=True)
    assert [(s["name"], s["steps"]) for s in summary.stages] == [("retrieval", 2), ("blend", 3)]


def test_full_disk_while_saving_a_model_folder_is_an_os_error_naming_it(converted, tmp_path, monkeypatch):
    """Final and stage folders are written through `atomic_folder`: a full disk there (safetensors' own error type)
    becomes OSError(ENOSPC) naming the folder, which the CLI prints as one line, and leaves no half folder."""
    import errno

    from safetensors import SafetensorError

    def fill_disk(embedder, folder, state_dict):
        (folder / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    embedder = Embedder.from_pretrained(converted)
    monkeypatch.setattr(model_folder, "write_folder", fill_disk)
    with pytest.raises(OSError) as caught:
        embedder.save_pretrained(tmp_path / "final")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "final")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_check_loads_data_but_no_model(converted, tmp_path):
    recipe = write_workspace(tmp_path, converted)
    report = check_recipe(recipe)
    print(report)
    assert "stages[0] retrieval: 3 steps of 4, 8 batches per epoch\n  datasets[0] triplets.jsonl: 32 rows" in report
    assert "stages[1] blend: 3 steps of 4" in report
    assert not (tmp_path / "run").exists()


def test_evaluation_corpus_sample_keeps_relevant_documents(converted, tmp_path):
    recipe = load_recipe(write_workspace(tmp_path, converted))
    (data, instruction), = Evaluator.from_spec(recipe.eval).beir
    assert len(data.documents) == 36 and instruction == "Find the sentence"
    assert {f"d{i}" for i in range(32)} <= set(data.doc_ids)  # the 32 relevant ones, plus 4 of 8 distractors


def test_quantization_needs_a_gpu(converted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    recipe = write_workspace(tmp_path, converted)
    with pytest.raises(UserError, match=r"^quantization: 4bit .* needs a CUDA GPU"):
        train(recipe, overrides=["quantization=4bit"])
    assert not (tmp_path / "run").exists()


def test_lora_auto_is_an_adapter_for_every_base_and_null_trains_every_weight(converted, tmp_path, capsys):
    from llm2emb.train import setup as runner
    from llm2emb.train.recipe import LoraSpec

    path = write_workspace(tmp_path, converted)
    embedder = Embedder.from_pretrained(converted)
    assert runner.resolve_lora(load_recipe(path, ["lora=auto"]), embedder) == LoraSpec(r=16, alpha=32)  # tiny too
    assert "lora: auto -> a LoRA adapter (r 16, alpha 32" in capsys.readouterr().err
    assert runner.resolve_lora(load_recipe(path, ["lora={r: 2}"]), embedder) == LoraSpec(r=2)
    assert runner.resolve_lora(load_recipe(path, ["lora=null"]), embedder) is None


def test_default_lora_adapter_is_deterministic_in_training_mode(converted):
    """No LoRA dropout by default: PEFT's dropout would copy every adapted linear's input (memory above full FT)."""
    from llm2emb.train import setup as runner
    from llm2emb.train.recipe import LoraSpec

    embedder = Embedder.from_pretrained(converted, torch_dtype=torch.float32)
    runner.apply_lora(embedder, SimpleNamespace(quantization="none"), LoraSpec())
    with torch.no_grad():  # B starts at zero, which would hide the adapter's input (and any dropout on it)
        for name, parameter in embedder.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    embedder.train()
    batch = embedder.tokenize(["a man plays a guitar", "proteins fold"])
    with torch.no_grad():
        assert torch.equal(embedder.forward(batch), embedder.forward(batch))
