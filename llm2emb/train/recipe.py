"""The training recipe's schema: every key, its default and its checks, as pydantic models.

Reading a recipe file (YAML, `--set` overrides, stage-key inheritance, errors with file:line) is
`llm2emb.train.recipe_file`. Relative dataset, evaluation and model paths resolve against the recipe file's folder
(passed as validation context); `output_dir` resolves against the working directory (where a user expects `runs/...`
to appear).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

RESOLVED_NAME = "recipe.resolved.yaml"
ROW_FILE_SUFFIXES = {
    ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text",
}
# Keys a stage does not inherit from the stage before it.
NOT_INHERITED = {"name", "datasets", "objective", "mine", "bidirectional_warmup"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _local_path(value: str, info: ValidationInfo) -> Path:
    """A user path: `~` expanded, relative ones taken from the recipe's folder."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def model_reference(value: str, info: ValidationInfo) -> str:
    """A model named in a recipe: an asset alias or hub id as given, a local path made absolute; a local-looking
    path that does not exist fails here, before anything loads."""
    from llm2emb.assets import ASSETS

    if value in ASSETS:
        return value
    path = _local_path(value, info)
    if path.exists():
        return str(path.resolve())
    looks_local = value.startswith((".", "/", "~")) or path.suffix == ".gguf" or value.count("/") > 1
    if looks_local:
        raise ValueError(f"{value}: not found (relative paths start at the recipe's folder)")
    return value  # a hub id, checked when the model loads


class ModelSpec(_Strict):
    base: str
    """Hub id, HF folder, .gguf file, llm2emb folder, or an alias from llm2emb.assets (e.g. smollm2-135m)."""
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    causal_sink: bool | None = None
    """Keep each text's first token causal in bidirectional attention (llm2emb.model.attention); None: an llm2emb folder's
    own choice, and on for a bidirectional base."""
    pooling: str | dict[str, Any] | None = None
    """A pooler name or {type: ..., args}; None: the folder's pooling for an llm2emb folder, else mean."""
    text_template: str | None = None
    """Around every text: chat (the base's chat template around one user message) | turn (that user turn alone) | bos
    (one leading token) | none | a template with {text} (llm2emb.model.prompts.text_template_for); None: an llm2emb
    folder's own, and for a base the default (bos with the causal sink where its tokenizer has a token to lead with,
    else none)."""
    max_length: Annotated[int, Field(gt=0)] = 512
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype at load: auto means bfloat16 on a CUDA GPU and float32 on the CPU."""

    @field_validator("base")
    @classmethod
    def _base_exists(cls, value: str, info: ValidationInfo) -> str:
        return model_reference(value, info)

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        """Unknown pooler names and arguments fail here, not after the model has loaded."""
        import inspect

        from llm2emb.pooling import POOLERS, as_pooling_spec

        if value is None:
            return value
        spec = as_pooling_spec(value)
        kind = spec.pop("type", None)
        if kind not in POOLERS:
            raise ValueError(f"unknown pooling type {kind!r}; choose one of {sorted(POOLERS)}")
        accepted = set(inspect.signature(POOLERS[kind].__init__).parameters) - {"self", "hidden_size", "num_layers"}
        unknown = sorted(set(spec) - accepted)
        if unknown:
            raise ValueError(f"{kind} pooling takes no {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
        return value


class LoraSpec(_Strict):
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """0 by default: PEFT's dropout copies each adapted linear's input for the backward (q, k and v each their own),
    which put a LoRA run above full fine-tuning's peak memory on SmolLM2 (benchmarks/RESULTS.md, "LoRA memory")."""
    target_modules: str | list[str] = "all-linear"


class DatasetSpec(_Strict):
    path: str
    """A JSONL/CSV/TSV/parquet file, a BEIR folder, (format: hf) a hub id or anything `datasets.load_dataset`
    reads (a `save_to_disk` folder too), (format: mteb) a retrieval task in MTEB's hub layout (`mteb/scifact`: its
    qrels split's query-document pairs), or (objective: mntp or simcse) a .txt file of one text per line."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "beir", "scored_pairs", "hf", "mteb", "text"] = "auto"
    split: str = "train"
    """BEIR qrels split, or the split asked of `datasets.load_dataset`."""
    subset: str | None = None
    """The configuration name passed to `datasets.load_dataset` (format: hf)."""
    columns: dict[Literal["query", "positive", "negative", "negatives", "instruction", "positive_span", "text"], str] = {}
    """Our field -> the column that holds it, e.g. {query: anchor, positive: pos}."""
    instruction: str | None = None
    """Put in front of every query of this dataset (a row's own `instruction` field wins)."""
    weight: Annotated[float, Field(gt=0)] = 1.0
    """Batches per epoch = weight x (rows // batch_size): 2.0 sees every row twice an epoch."""
    in_batch_negatives: bool = True
    score_threshold: float = 4.0
    """format: scored_pairs: rows with score >= threshold become (sentence1, sentence2) pairs."""
    max_rows: Annotated[int, Field(gt=0)] | None = None
    """Keep only the first N valid rows."""

    @model_validator(mode="after")
    def _resolve_format(self, info: ValidationInfo) -> DatasetSpec:
        path = _local_path(self.path, info)
        if self.format in ("hf", "mteb"):  # a local folder or script for load_dataset, else a hub id
            self.path = str(path.resolve()) if path.exists() else self.path
            return self
        if not path.exists():
            hint = " (for a dataset from the hub set format: hf)" if self.format == "auto" else ""
            raise KeyPathError("path", f"{self.path}: file not found{hint}")
        if self.format == "auto":
            if path.is_dir():
                if not (path / "corpus.jsonl").is_file():
                    raise KeyPathError("path", f"{self.path}: a folder must be BEIR-shaped (corpus.jsonl missing)")
                self.format = "beir"
            elif path.suffix.lower() in ROW_FILE_SUFFIXES:
                self.format = ROW_FILE_SUFFIXES[path.suffix.lower()]
            else:
                raise KeyPathError("path", f"{self.path}: unknown file type {path.suffix!r}; set format:")
        elif self.format == "beir" and not path.is_dir():
            raise KeyPathError("path", f"{self.path}: format beir needs a folder")
        elif self.format != "beir" and path.is_dir():
            raise KeyPathError("path", f"{self.path}: is a folder, format {self.format} needs a file")
        if self.format == "beir" and not (path / "qrels" / f"{self.split}.tsv").is_file():
            raise KeyPathError("split", f"{self.split}: {path / 'qrels' / (self.split + '.tsv')} not found")
        self.path = str(path.resolve())
        return self


class MineSpec(_Strict):
    """Hard negatives mined with the stage's starting weights before it trains (see llm2emb.commands.mine); the rows become
    one more dataset of the stage, and a resumed stage reuses the file it mined."""

    corpus: str
    """BEIR corpus.jsonl: where negatives come from."""
    queries: str | None = None
    """BEIR queries.jsonl, with qrels."""
    qrels: str | None = None
    pairs: str | None = None
    """Training rows with query and positive (instead of queries + qrels)."""
    top_k: Annotated[int, Field(gt=0)] = 100
    rank_window: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(gt=0)]] | None = None
    """[start, end): ranks kept after the positives are removed; default [0, top_k]."""
    margin: Annotated[float, Field(gt=0)] | None = 0.95
    num_negatives: Annotated[int, Field(gt=0)] = 7
    instruction: str | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0
    batch_size: Annotated[int, Field(gt=0)] = 32

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> MineSpec:
        for name in ("corpus", "queries", "qrels", "pairs"):
            value = getattr(self, name)
            if value is not None:
                path = _local_path(value, info)
                if not path.is_file():
                    raise KeyPathError(name, f"{value}: file not found")
                setattr(self, name, str(path.resolve()))
        if (self.qrels is None) == (self.pairs is None):
            raise KeyPathError("qrels", "give exactly one of qrels (with queries) or pairs")
        if self.qrels is not None and self.queries is None:
            raise KeyPathError("queries", "qrels needs queries (BEIR queries.jsonl)")
        if self.rank_window is not None and not self.rank_window[0] < self.rank_window[1] <= self.top_k:
            raise KeyPathError("rank_window", f"{list(self.rank_window)} must satisfy start < end <= top_k ({self.top_k})")
        return self


class TeacherSpec(_Strict):
    """Distillation from a frozen teacher embedder (EmbeddingGemma, jina-embeddings-v5, KaLM-V2.5 train this way).

    Stage loss = infonce_weight x InfoNCE + kl_weight x KL(teacher || student) over each query's candidates (its
    positive, hard and in-batch negatives, softmax at `temperature`) + margin_weight x MarginMSE on its hard
    negatives (score differences positive - negative, in logits: score / temperature). See
    llm2emb.train.distillation.
    """

    model: str
    """A sentence-transformers folder, an llm2emb folder or base, or an asset alias (e.g. all-minilm-l6-v2); it
    embeds the raw texts with its own tokenizer."""
    kl_weight: Annotated[float, Field(ge=0)] = 1.0
    margin_weight: Annotated[float, Field(ge=0)] = 0.0
    infonce_weight: Annotated[float, Field(ge=0)] = 1.0
    temperature: Annotated[float, Field(gt=0)] | None = None
    """Softmax temperature of both score distributions; default: the stage's temperature."""
    instructions: bool = False
    """Give the teacher each query's instruction too (for a teacher trained with the same instructions); false:
    the teacher embeds queries its own way (a sentence-transformers `query` prompt if it defines one)."""
    max_length: Annotated[int, Field(gt=0)] | None = None
    """The teacher's token limit; default: its own."""
    batch_size: Annotated[int, Field(gt=0)] = 64
    """Texts per teacher forward when filling its cache."""

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        return model_reference(value, info)

    @model_validator(mode="after")
    def _something_to_learn(self) -> TeacherSpec:
        if not (self.kl_weight or self.margin_weight):
            raise KeyPathError("kl_weight", "kl_weight and margin_weight are both 0: the teacher would teach nothing")
        return self


class LateInteractionSpec(_Strict):
    """ColBERT-style late interaction beside the pooled vector: a linear head projects every token's state to `dim`
    dimensions, and `weight` x InfoNCE over the normalised Chamfer (MaxSim) scores of the stage's queries and
    candidates joins the loss (llm2emb.train.late_loss). The saved model keeps the head (token_head.safetensors):
    `Embedder.encode_tokens` and multi-vector retrieval (llm2emb.retrieval.muvera) then use `dim`-wide token vectors instead
    of the hidden states."""

    dim: Annotated[int, Field(gt=0)] = 128
    """Width of a token vector (ColBERT's 128)."""
    weight: Annotated[float, Field(gt=0)] = 1.0


class CollapseGuardSpec(_Strict):
    """When a stage stops because its embeddings collapsed (llm2emb.train.collapse): after `patience` optimizer
    steps in a row, warmup excluded, whose batch has a mean cosine between different texts of at least `cosine` and a
    loss of at least `loss_ratio` x the chance loss ln(candidates); losses without a chance level (graded pairs,
    distillation) use `cosine_alone`. At a stage's end it also stops one whose last `patience` steps averaged a loss
    at or above chance, or at least `regression` x its first step's loss (and half of chance). The stop names the
    stage, step, loss and spread and writes no model."""

    patience: Annotated[int, Field(gt=0)] = 10
    cosine: Annotated[float, Field(gt=0, le=1)] = 0.95
    loss_ratio: Annotated[float, Field(gt=0)] = 0.9
    cosine_alone: Annotated[float, Field(gt=0, le=1)] = 0.99
    regression: Annotated[float, Field(gt=1)] = 1.5


class StageSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    objective: Literal["contrastive", "mntp", "simcse"] = "contrastive"
    """mntp / simcse: LLM2Vec's adaptation stages on raw text (see llm2emb.train.objectives); not inherited."""
    mask_probability: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """objective mntp: the fraction of tokens masked."""
    simcse_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """objective simcse: attention dropout during the stage (the two views differ only by dropout)."""
    max_steps: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)] = 32
    """The contrastive batch across all processes: each query sees batch_size - 1 in-batch negatives."""
    gradcache_chunk: Annotated[int, Field(gt=0)] | None = None
    """Rows per forward pass (memory of the chunk, gradients of the batch); default: the whole batch."""
    learning_rate: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """auto: 4e-4 for full fine-tuning and 2e-3 for a LoRA adapter, scaled by 576 / hidden size for bases wider than
    SmolLM2-135M's 576 (llm2emb.train.learning_rate); the run prints the rate and summary.json records it. 4e-4: a
    bidirectional model moves far from its causal pretraining, and 5e-5 (sentence-transformers' default) adapts it too
    slowly; on SmolLM2-135M at 51 x 32, STS-B rose from 45 (5e-5) through 57 (1e-4) and 62-65 (2e-4) to 70 (4e-4)
    (benchmarks/RESULTS.md, "Matched budget")."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Layer-wise rate decay: decoder layer i trains at learning_rate x decay^(L - i), the token embeddings at
    learning_rate x decay^(L + 1), the pooler and heads at learning_rate (llm2emb.train.layer_rates); 1: one rate."""
    warmup_steps: int | float = 0.1
    """Linear warmup from 0 to learning_rate: a whole number counts steps, a fraction below 1 is that share of
    max_steps, rounded down (so a run of under 10 steps has none by default). A LoRA adapter on a cold bidirectional model gets gradient norms in the hundreds on its
    first steps; without warmup, Adam's first full-size updates sent one seed of three into a collapse it never
    left (benchmarks/RESULTS.md, "Matched budget")."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    temperature: Annotated[float, Field(gt=0)] = 0.05
    loss: Literal["infonce", "cosent", "angle"] = "infonce"
    """infonce: contrastive over in-batch and hard negatives. cosent / angle: graded pairs (llm2emb.train.graded),
    trained on the order of their gold scores at scale 1 / temperature; every dataset must be `scored_pairs`, whose
    pairs then keep their scores instead of being thresholded."""
    angle_weight: Annotated[float, Field(ge=0)] = 1.0
    """loss: angle: weight of the angle-difference ranking next to the cosine one."""
    learnable_temperature: bool = False
    hard_negatives: Annotated[int, Field(ge=0)] = 0
    """k negatives per query; rows with fewer are filled deterministically (see llm2emb.train.data)."""
    max_length: Annotated[int, Field(gt=0)] | None = None
    """Token limit for this stage; default: model.max_length."""
    bidirectional_warmup: Annotated[int, Field(ge=0)] = 0
    """Soft causal-to-bidirectional curriculum (Conan-embedding-v2): over this many steps the attention to later
    tokens grows from 0 (causal, as the decoder was pretrained) to full (bidirectional); 0: bidirectional from the
    first step. Needs `model.attention: bidirectional` and padded batches; not inherited."""
    hardness_weight: Annotated[float, Field(ge=0)] = 0.0
    """Focal-style weights w = |N| softmax(strength x score) on each query's negatives (0: plain InfoNCE)."""
    false_negative_margin: Annotated[float, Field(gt=0)] | None = None
    """Mask a negative scoring >= margin x its query's positive score (e.g. 0.95); null: keep all."""
    guide_model: str | None = None
    """GISTEmbed: a frozen model (llm2emb folder or base, same tokenizer) whose scores mask negatives it ranks
    above the positive."""
    teacher: TeacherSpec | None = None
    """Distill a frozen teacher's scores into the model, next to InfoNCE (see TeacherSpec)."""
    matryoshka_dims: list[Annotated[int, Field(gt=0)]] | None = None
    """Loss summed over these leading dimensions of the embedding (MRL), e.g. [64, 128, 256, 576]."""
    matryoshka_layers: list[tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]] | None = None
    """2D Matryoshka (Starbucks): [[layers, dim], ...]; loss summed over the embedding of the first `layers`
    transformer layers truncated to `dim`, for every pair (include the full model's pair to train it too)."""
    late_interaction: LateInteractionSpec | None = None
    """Train token vectors for multi-vector retrieval next to the pooled vector (see LateInteractionSpec)."""
    mine: MineSpec | None = None
    """Re-mine hard negatives with the weights this stage starts from; not inherited."""
    collapse_guard: CollapseGuardSpec | None = CollapseGuardSpec()
    """Stop a contrastive or simcse stage whose embeddings collapse (see CollapseGuardSpec); null: never."""
    datasets: list[DatasetSpec]
    """At least one, unless `mine` provides the stage's data."""

    @field_validator("guide_model")
    @classmethod
    def _guide_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else ModelSpec._base_exists(value, info)

    @field_validator("matryoshka_dims", "matryoshka_layers")
    @classmethod
    def _distinct(cls, value: list | None) -> list | None:
        if value is not None:
            if not value:
                raise ValueError("an empty list; leave the key out to train one size")
            repeated = [item for index, item in enumerate(value) if item in value[:index]]
            if repeated:
                raise ValueError(f"{list(repeated[0]) if isinstance(repeated[0], tuple) else repeated[0]} is listed twice")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _steps_or_share(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value.is_integer() and value >= 1:
            value = int(value)
        if value < 0 or (isinstance(value, float) and value >= 1):
            raise ValueError(f"{value}: a whole number of steps (>= 0) or a share of max_steps below 1 (e.g. 0.1)")
        return value

    @property
    def warmup_step_count(self) -> int:
        """warmup_steps as a number of optimizer steps."""
        if isinstance(self.warmup_steps, float):
            return math.floor(self.warmup_steps * self.max_steps)
        return self.warmup_steps

    @model_validator(mode="after")
    def _chunk_divides_batch(self) -> StageSpec:
        if self.gradcache_chunk is None:
            self.gradcache_chunk = self.batch_size
        if self.batch_size % self.gradcache_chunk:
            raise KeyPathError("gradcache_chunk", f"{self.gradcache_chunk} must divide batch_size ({self.batch_size})")
        if self.warmup_step_count >= self.max_steps:
            raise KeyPathError("warmup_steps", f"{self.warmup_steps} ({self.warmup_step_count} steps) leaves no step "
                                              f"after warmup: max_steps is {self.max_steps}")
        if not self.datasets and self.mine is None:
            raise KeyPathError("datasets", "a stage needs at least one dataset (or mine:)")
        if self.mine is not None and (self.objective != "contrastive" or not self.hard_negatives):
            raise KeyPathError("mine", "mined negatives need objective contrastive and hard_negatives >= 1")
        if self.objective != "contrastive" and self.hard_negatives:
            raise KeyPathError("hard_negatives", f"objective {self.objective} trains on raw text; set 0")
        if self.teacher is not None and self.objective != "contrastive":
            raise KeyPathError("teacher", f"objective {self.objective} has no query-document scores to distill")
        if self.late_interaction is not None and self.objective != "contrastive":
            raise KeyPathError("late_interaction", f"objective {self.objective} has no queries and documents to score")
        if self.late_interaction is not None and self.matryoshka_layers:
            raise KeyPathError("late_interaction", "cannot be combined with matryoshka_layers (token vectors come "
                                                   "from the full model only)")
        if self.teacher is not None and self.teacher.margin_weight and not self.hard_negatives:
            raise KeyPathError(("teacher", "margin_weight"), "MarginMSE scores hard negatives: set hard_negatives >= 1")
        for index, dataset in enumerate(self.datasets):
            if dataset.format == "text" and self.objective == "contrastive":
                raise KeyPathError(("datasets", index, "path"),
                                f"{Path(dataset.path).name}: a .txt file holds raw text, for objective mntp or simcse")
            if not dataset.in_batch_negatives and self.objective == "simcse":
                raise KeyPathError(("datasets", index, "in_batch_negatives"),
                                "objective simcse needs in-batch negatives (they are its only negatives)")
            if not dataset.in_batch_negatives and self.hard_negatives == 0:
                raise KeyPathError(
                    ("datasets", index, "in_batch_negatives"),
                    "false with hard_negatives: 0 leaves each query one candidate (its positive): nothing to learn",
                )
        return self


class StsEvalSpec(_Strict):
    path: str
    """A TSV with the header `score  sentence1  sentence2`, or (format: hf) a hub id or folder `datasets` reads
    with columns sentence1, sentence2, score (`sentence-transformers/stsb`)."""
    format: Literal["tsv", "hf"] = "tsv"
    split: str = "test"
    """format: hf: the split asked of `datasets.load_dataset`."""
    subset: str | None = None
    """format: hf: the configuration name."""

    @model_validator(mode="after")
    def _exists(self, info: ValidationInfo) -> StsEvalSpec:
        path = _local_path(self.path, info)
        if self.format == "hf":  # a local folder, else a hub id, checked when it loads
            self.path = str(path.resolve()) if path.exists() else self.path
            return self
        if not path.is_file():
            raise KeyPathError("path", f"{self.path}: file not found (for a dataset from the hub set format: hf)")
        self.path = str(path.resolve())
        return self


class BeirEvalSpec(_Strict):
    path: str
    """A BEIR folder, or (format: mteb) a retrieval task in MTEB's hub layout: a hub id like `mteb/scifact` or its
    local copy."""
    format: Literal["beir", "mteb"] = "beir"
    split: str = "test"
    instruction: str | None = None
    corpus_sample: Annotated[int, Field(gt=0)] | None = None
    """Keep N corpus documents (every relevant one plus seeded others) so evaluation during training stays quick."""

    @model_validator(mode="after")
    def _exists(self, info: ValidationInfo) -> BeirEvalSpec:
        path = _local_path(self.path, info)
        if self.format == "mteb":
            self.path = str(path.resolve()) if path.exists() else self.path
            return self
        if not path.is_dir():
            raise KeyPathError("path", f"{self.path}: BEIR folder not found (for a task from the hub set format: "
                                       "mteb)")
        if not (path / "qrels" / f"{self.split}.tsv").is_file():
            raise KeyPathError("split", f"{self.split}: {path / 'qrels' / (self.split + '.tsv')} not found")
        self.path = str(path.resolve())
        return self


class EvalSpec(_Strict):
    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Evaluate every N optimizer steps of each stage; None: only before and after training."""
    at_start: bool = True
    at_end: bool = True
    batch_size: Annotated[int, Field(gt=0)] = 32
    sts: list[StsEvalSpec] = []
    beir: list[BeirEvalSpec] = []


LoraChoice = Annotated[
    Annotated[LoraSpec, Tag("lora-spec")] | Annotated[Literal["auto"], Tag("lora-auto")],
    Discriminator(lambda value: "lora-auto" if isinstance(value, str) else "lora-spec"),
]
"""A mapping is a LoRA adapter, a string must be `auto`: tagged so an error names one branch, not both."""


class Recipe(_Strict):
    model: ModelSpec
    lora: LoraChoice | None = "auto"
    """auto: a LoRA adapter with LoraSpec's defaults (r 16, alpha 32, every linear layer) at its own rate, for every
    base: on SmolLM2-135M it was ahead of full fine-tuning on every held-out row order at 20 x 16 and 51 x 32
    (benchmarks/RESULTS.md, "Robust defaults"); null: every backbone weight; a mapping: that LoRA adapter."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    output_dir: str
    seed: Annotated[int, Field(ge=0)] = 42
    bf16: bool = False
    """Mixed precision (autocast) in bfloat16; needs a GPU or a CPU with bf16 support."""
    gradient_checkpointing: bool = False
    sharding: Literal["none", "fsdp"] = "none"
    """Several processes: none = DDP (each holds the whole model); fsdp = FSDP full sharding through accelerate
    (parameters, gradients and optimizer state split across processes, each decoder layer a unit), for bases that
    do not fit one GPU; with LoRA or full fine-tuning, GradCache and gathered embeddings alike."""
    on_bad_rows: Literal["fail", "skip"] = "fail"
    logging_steps: Annotated[int, Field(gt=0)] = 10
    save_steps: Annotated[int, Field(gt=0)] = 500
    save_total_limit: Annotated[int, Field(gt=0)] | None = 2
    report_to: list[str] = ["tensorboard"]
    """Trainer integrations; ones that are not installed are dropped with a note."""
    eval: EvalSpec = EvalSpec()
    stages: Annotated[list[StageSpec], Field(min_length=1)]

    @field_validator("output_dir")
    @classmethod
    def _absolute_output(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise KeyPathError(("stages", index, "name"), f"{name}: stage names must be unique")
        for index, stage in enumerate(self.stages):
            if stage.loss != "infonce":
                graded_stage_problem(stage, index)
            if stage.late_interaction and stage.late_interaction.dim != self.token_dim:
                raise KeyPathError(("stages", index, "late_interaction", "dim"),
                                   f"{stage.late_interaction.dim}: every stage trains the one token head, of "
                                   f"{self.token_dim} dimensions (the first late_interaction stage's)")
            if stage.bidirectional_warmup and self.model.attention != "bidirectional":
                raise KeyPathError(("stages", index, "bidirectional_warmup"),
                                "the causal-to-bidirectional curriculum needs model.attention: bidirectional")
        if self.model.causal_sink and self.model.attention != "bidirectional":
            raise KeyPathError(("model", "causal_sink"), "the causal sink is part of bidirectional attention; "
                               "model.attention is causal")
        if self.quantization != "none" and self.lora is None:
            raise KeyPathError("quantization", f"{self.quantization} needs lora: a quantized base trains only an adapter")
        return self

    @property
    def token_dim(self) -> int | None:
        """The width of the late-interaction head the run trains (the first stage's that has one), or None."""
        return next((stage.late_interaction.dim for stage in self.stages if stage.late_interaction), None)


INFONCE_ONLY_KEYS = ("hardness_weight", "false_negative_margin", "guide_model", "teacher", "matryoshka_dims",
                     "matryoshka_layers", "late_interaction", "mine")
"""Stage keys that act on InfoNCE's negatives or views, so a graded loss refuses them."""


def graded_stage_problem(stage: StageSpec, index: int) -> None:
    """Raise the key error of a cosent/angle stage that cannot run: it ranks scored pairs, with no negatives."""
    if stage.objective != "contrastive":
        raise KeyPathError(("stages", index, "loss"), f"{stage.loss} needs objective: contrastive")
    if stage.hard_negatives:
        raise KeyPathError(("stages", index, "hard_negatives"), f"loss {stage.loss} ranks pairs: set hard_negatives: 0")
    for key in INFONCE_ONLY_KEYS:
        if getattr(stage, key) not in (None, 0, 0.0, []):
            raise KeyPathError(("stages", index, key), f"acts on InfoNCE's negatives; loss {stage.loss} has none")
    for position, dataset in enumerate(stage.datasets):
        if dataset.format != "scored_pairs":
            raise KeyPathError(("stages", index, "datasets", position, "format"),
                            f"loss {stage.loss} needs graded pairs: format scored_pairs, got {dataset.format}")


class KeyPathError(ValueError):
    """A validation failure that belongs to a sub-key of the model that raises it (`key`, relative to the model);
    recipe_file turns it into the full key path with the file and line."""

    def __init__(self, key: str | tuple, message: str):
        super().__init__(message)
        self.key = (key,) if isinstance(key, str) else key
        self.message = message
