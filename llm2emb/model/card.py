"""A model folder's README.md: hub front matter, what the model is, how it was trained, what it scored and how to
load it, as sentence-transformers writes for its folders. Rendered only from what the folder and its run recorded
(llm2emb.json, the resolved recipe, the rows each dataset gave, the run's evaluations), never typed by hand;
uploading stays `hf upload` (huggingface_hub)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llm2emb.assets import ASSETS
from llm2emb.files import write_text_atomic
from llm2emb.model.config import CONFIG_NAME, EmbedderConfig
from llm2emb.model.serving import PORTABLE_POOLING

CARD_NAME = "README.md"
MAX_BASE_HOPS = 8
"""How many llm2emb folders a base chain is followed through to find the original base."""


@dataclass
class TrainingRecord:
    """What a run knows of itself when it writes its model: the card's training and evaluation sections."""

    recipe_path: str
    resolved_recipe: str
    """recipe.resolved.yaml's text: every key the run used, defaults included."""
    datasets: list[tuple[str, str, int]] = field(default_factory=list)
    """(stage name, dataset path, rows it gave) in stage order."""
    steps: int = 0
    seconds: float = 0.0
    evaluations: list[dict] = field(default_factory=list)
    """The run's evaluation records ({"stage", "step", "eval/<task>/<metric>": score})."""
    evaluation_commands: list[str] = field(default_factory=list)
    """`llm2emb eval` arguments that score each task again (MODEL stands for the folder)."""


@dataclass
class BaseFacts:
    hub_id: str | None
    license: str | None
    reference: str


def base_facts(config: EmbedderConfig) -> BaseFacts:
    """The original base of a model (through the llm2emb folders it was trained from), its hub id and licence when
    an asset, the base's own card or its config names them."""
    reference = config.base or "unknown"
    for _ in range(MAX_BASE_HOPS):
        folder = Path(reference)
        if not (folder / CONFIG_NAME).is_file():
            break
        inner = json.loads((folder / CONFIG_NAME).read_text()).get("base")
        if not inner or inner == reference:
            break
        reference = inner
    if reference in ASSETS:
        asset = ASSETS[reference]
        return BaseFacts(asset.hub_id, asset.license, reference)
    folder = Path(reference)
    licence = _front_matter(folder / CARD_NAME).get("license") if folder.is_dir() else None
    if licence is None and (folder / "config.json").is_file():
        licence = json.loads((folder / "config.json").read_text()).get("license")
    looks_like_hub_id = not folder.exists() and reference.count("/") == 1 and not reference.startswith((".", "/", "~"))
    return BaseFacts(reference if looks_like_hub_id else None, licence, reference)


def _front_matter(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---\n"):
        return {}
    block = text[4:].split("\n---", 1)[0]
    try:
        loaded = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def scores(record: dict) -> list[tuple[str, str, float]]:
    """(task, metric, score) of one evaluation record; a task name may hold a slash (`stsb/test`), a metric not."""
    return [(*key[len("eval/"):].rsplit("/", 1), value) for key, value in record.items() if key.startswith("eval/")]


def final_scores(training: TrainingRecord | None) -> list[tuple[str, str, float]]:
    """(task, metric, score) of the run's last evaluation."""
    return scores(training.evaluations[-1]) if training is not None and training.evaluations else []


def front_matter(name: str, config: EmbedderConfig, base: BaseFacts, training: TrainingRecord | None) -> str:
    meta: dict = {}
    if base.hub_id:
        meta["base_model"] = base.hub_id
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "sentence-similarity"
    meta["tags"] = ["llm2emb", "feature-extraction", "sentence-similarity", f"{config.attention}-attention",
                    *(["causal-sink"] if config.causal_sink else [])]
    if base.license:
        meta["license"] = base.license
    scores = final_scores(training)
    if scores:
        results = []
        for task, metric, value in scores:
            kind = "STS" if metric == "spearman" else "Retrieval"
            results.append({"task": {"type": kind}, "dataset": {"name": task, "type": task},
                            "metrics": [{"type": metric, "value": value}]})
        meta["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render(folder: Path, config: EmbedderConfig, training: TrainingRecord | None = None,
           source: str | None = None) -> str:
    """The card's text for `folder` (written or about to be written with `config`)."""
    name = Path(folder).resolve().name
    base = base_facts(config)
    sink = ("yes: each text's first token attends to itself alone, as in the causal base (llm2emb's causal sink)"
            if config.causal_sink else "no")
    lines = [front_matter(name, config, base, training), f"# {name}", "",
             f"A text embedding model made with llm2emb from `{base.hub_id or base.reference}`"
             + (f" (exported from `{source}`)" if source else "") + ": the card is generated from what the folder "
             "and its training run recorded.", "",
             "## Conversion", "",
             "| setting | value |", "|---|---|",
             f"| base | `{base.reference}` |",
             f"| weights | {'a PEFT adapter on `' + str(config.base) + '`' if config.backbone == 'adapter' else 'full'} |",
             f"| attention | {config.attention} |",
             f"| causal sink | {sink} |",
             f"| pooling | `{json.dumps(config.pooling)}` |",
             f"| normalised | {'yes' if config.normalize else 'no'} |",
             f"| max length | {config.max_length} tokens |",
             f"| query template | `{json.dumps(config.query_template)}` |",
             f"| document template | `{json.dumps(config.document_template)}` |",
             f"| text template (every text) | `{json.dumps(config.text_template)}` |",
             f"| default query instruction | {_or_none(config.default_query_instruction)} |",
             f"| default document instruction | {_or_none(config.default_document_instruction)} |",
             f"| Matryoshka dims | {_or_none(config.matryoshka_dims)} |",
             f"| RoPE scaling | {_or_none(config.rope_scaling)} |",
             f"| late-interaction head | {_or_none(config.token_dim)} |", ""]
    if training is not None:
        lines += training_section(training)
    lines += usage_section(name, config)
    lines += ["## Licence", "",
              f"The base's licence: {base.license}." if base.license else
              "The base named no licence in its card, its config or llm2emb's asset list: check the base's terms.", ""]
    return "\n".join(lines)


def training_section(training: TrainingRecord) -> list[str]:
    lines = ["## Training", "", f"`llm2emb train {training.recipe_path}`: {training.steps} optimizer steps in "
             f"{training.seconds:.0f} s.", "", "| stage | dataset | rows |", "|---|---|---|"]
    lines += [f"| {stage} | `{path}` | {rows:,} |" for stage, path, rows in training.datasets]
    lines += ["", "The resolved recipe (every key the run used, defaults included):", "", "```yaml",
              training.resolved_recipe.rstrip("\n"), "```", ""]
    if training.evaluations:
        lines += ["## Evaluation", "", "Scored by the run itself (`eval:` of the recipe), x100:", "",
                  "| when | task | metric | score |", "|---|---|---|---|"]
        for record in training.evaluations:
            lines += [f"| {record['stage']} (step {record['step']}) | {task} | {metric} | {value:.2f} |"
                      for task, metric, value in scores(record)]
        if training.evaluation_commands:
            lines += ["", "Each score again, on this folder (MODEL):", "", "```bash",
                      *(f"llm2emb eval MODEL {command}" for command in training.evaluation_commands), "```"]
        lines.append("")
    return lines


def usage_section(name: str, config: EmbedderConfig) -> list[str]:
    lines = ["## Usage", "", "With llm2emb:", "", "```python", "from llm2emb import Embedder",
             "", f'model = Embedder.from_pretrained("{name}")',
             'queries = model.encode_queries(["what is a guitar?"])',
             'documents = model.encode_documents(["A guitar is a string instrument."])',
             "scores = queries @ documents.T", "```", "",
             "From the command line:", "", "```bash", f"llm2emb encode {name} --input texts.txt --output emb.npy",
             "```", ""]
    if config.causal_sink:
        lines += ["sentence-transformers, vLLM and TEI cannot load this folder with the same vectors: they attend from "
                  "the first token too, and this model keeps it causal. Train from a base converted with "
                  "`llm2emb convert --no-causal-sink` for a folder they serve.", ""]
    else:
        lines += ["With sentence-transformers, export it first:", "", "```bash",
                  f"llm2emb export {name} --format sentence-transformers --out {name}-st", "```", "", "```python",
                  "from sentence_transformers import SentenceTransformer", "",
                  f'model = SentenceTransformer("{name}-st")  # trust_remote_code=True for trainable poolers',
                  'embeddings = model.encode(["A guitar is a string instrument."])', "```", ""]
    if not config.causal_sink and config.pooling["type"] in PORTABLE_POOLING:
        lines += ["With vLLM (the exported folder; queries take their prompt, `prompts.query` of "
                  "config_sentence_transformers.json, in front; TEI and the keys each engine reads: llm2emb's "
                  "docs/SERVING.md):", "", "```bash", f"vllm serve {name}-st --runner pooling", "```", ""]
    lines += ["With ONNX Runtime (every pooler, the causal sink included):", "", "```bash",
              f"llm2emb export {name} --format onnx --out {name}-onnx", "```", "", "```python",
              "from llm2emb.commands.export_onnx import OnnxEncoder", "", f'encoder = OnnxEncoder("{name}-onnx")',
              'vectors = encoder.encode_documents(["A guitar is a string instrument."])', "```", ""]
    adapter = config.backbone == "adapter"
    lines += ["With plain transformers" + (" and PEFT" if adapter else "") + " (hidden states; pool them as the "
              "conversion table says):", "", "```python", "from transformers import AutoModel"]
    if adapter:
        lines.append("from peft import PeftModel")
    if config.causal_sink:
        lines.append("from llm2emb.model.attention import set_causal_sink")
    lines.append("")
    if adapter:
        lines.append(f'model = PeftModel.from_pretrained(AutoModel.from_pretrained("{config.base}"), "{name}")')
    else:
        lines.append(f'model = AutoModel.from_pretrained("{name}")')
    if config.causal_sink:
        lines.append("set_causal_sink(model, True)  # the first token attends to itself alone, as in training")
    lines += ["```", ""]
    return lines


def _or_none(value) -> str:
    return "none" if value in (None, [], {}) else f"`{value}`"


def write_card(folder: Path, config: EmbedderConfig, training: TrainingRecord | None = None,
               source: str | None = None) -> Path:
    """Write `folder`/README.md (replacing one written before)."""
    return write_text_atomic(Path(folder) / CARD_NAME, render(folder, config, training, source))
