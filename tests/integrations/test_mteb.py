"""mteb runs llm2emb models through MtebEncoder on local tasks (files, no hub) and scores them as `llm2emb eval` does."""

import csv
import json

import pytest

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

from llm2emb import Embedder  # noqa: E402
from llm2emb.evaluate import load_beir, load_sts  # noqa: E402
from llm2emb.evaluate.runner import evaluate_model  # noqa: E402
from llm2emb.integrations.mteb import MtebEncoder  # noqa: E402

INSTRUCTION = "Given a question, retrieve passages that answer it"
CORPUS = [
    ("d1", "Music", "A man is playing a guitar on the street."),
    ("d2", "", "A woman is slicing an onion in the kitchen."),
    ("d3", "Biology", "Proteins fold into three-dimensional structures."),
    ("d4", "", "The cat sat on the mat and looked at the dog."),
    ("d5", "Chemistry", "Enzymes catalyse reactions in every living cell."),
    ("d6", "", "Paris is the capital of France."),
    ("d7", "Sport", "The team won the final after extra time."),
    ("d8", "", "Rain is expected over the weekend."),
]
QUERIES = [("q1", "who plays the guitar?"), ("q2", "what do proteins and enzymes do?"), ("q3", "cats and dogs"),
           ("q4", "capital city of France"), ("q5", "weather forecast")]
QRELS = [("q1", "d1", 1), ("q2", "d3", 1), ("q2", "d5", 1), ("q3", "d4", 1), ("q4", "d6", 1), ("q5", "d8", 1),
         ("q5", "d7", 0)]
PAIRS = [
    (4.8, "A man is playing a guitar.", "A man plays the guitar."),
    (0.2, "A woman is slicing an onion.", "The cat sat on the mat."),
    (3.1, "The cat sat on the mat.", "A cat is sitting on a mat."),
    (1.0, "Proteins fold into structures.", "A man is playing a guitar."),
    (2.5, "Enzymes catalyse reactions.", "Proteins fold into structures."),
    (4.0, "Paris is the capital of France.", "The capital of France is Paris."),
]
COMMON = dict(
    description="A local task read from files written by the test.", reference="https://example.org",
    dataset={"path": "local", "revision": "local"}, category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"],
    date=("2024-01-01", "2024-01-01"), dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0",
    annotations_creators="derived", modalities=["text"], sample_creation="found", bibtex_citation="",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mteb_local")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                               for i, t, x in CORPUS))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in QUERIES))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n"
                                                                                      for q, d, s in QRELS))
    sts = root / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{s}\t{a}\t{b}\n" for s, a, b in PAIRS))
    return beir, sts


def local_tasks(beir, sts):
    """An mteb retrieval task and an STS task whose data come from the files (read without llm2emb's loaders)."""

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="LocalRetrieval", main_score="ndcg_at_10", **COMMON)

        def load_data(self, num_proc=None, **kwargs):
            corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
            queries = [json.loads(line) for line in (beir / "queries.jsonl").read_text().splitlines()]
            qrels = {}
            with (beir / "qrels" / "test.tsv").open() as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q["_id"], "text": q["text"]} for q in queries]),
                corpus=Dataset.from_list([{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in corpus]),
                relevant_docs=qrels, top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(type="STS", name="LocalSTS", main_score="cosine_spearman", **COMMON)
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):
            with sts.open() as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                "score": [float(r["score"]) for r in rows]})})
            self.data_loaded = True

    return LocalRetrieval(), LocalSTS()


@pytest.fixture(scope="module")
def model(tiny_qwen2, tmp_path_factory):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype="float32")
    embedder.config.default_query_instruction = INSTRUCTION
    return embedder.save_pretrained(tmp_path_factory.mktemp("mteb_model") / "model")


def test_mteb_scores_equal_llm2emb_eval(model, files):
    beir, sts = files
    encoder = MtebEncoder(model)
    assert isinstance(encoder, EncoderProtocol)
    result = mteb.evaluate(encoder, list(local_tasks(beir, sts)), cache=None, show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}

    ours = evaluate_model(Embedder.from_pretrained(model), sts=[load_sts(sts)], beir=[load_beir(beir)],
                          use_cache=False)
    sts_result, retrieval = ours.results
    assert 100 * scores["LocalSTS"]["cosine_spearman"] == pytest.approx(sts_result.scores["spearman"], abs=1e-6)
    # mteb rounds retrieval scores to 5 decimals of the [0, 1] value.
    for theirs, mine in [("ndcg_at_10", "ndcg@10"), ("recall_at_100", "recall@100"), ("mrr_at_10", "mrr@10")]:
        assert 100 * scores["LocalRetrieval"][theirs] == pytest.approx(retrieval.scores[mine], abs=1e-3), theirs
    assert 0 < retrieval.scores["ndcg@10"] < 100  # rankings are neither perfect nor empty


def test_prompt_types_map_to_queries_documents_and_instructions(model, files):
    """Queries get the task's instruction (given > task metadata > folder default); documents and STS get none."""
    retrieval, sts = local_tasks(*files)
    embedder = Embedder.from_pretrained(model)
    texts = [q for _, q in QUERIES]
    loader = [{"text": texts[:2]}, {"text": texts[2:]}]
    encoder = MtebEncoder(embedder, instructions={"LocalSTS": "Retrieve semantically similar text."})
    kw = dict(hf_split="test", hf_subset="default")
    encode = encoder.encode
    assert encode(loader, task_metadata=retrieval.metadata, prompt_type=mteb.types.PromptType.query, **kw) == \
        pytest.approx(embedder.encode_queries(texts, instruction=INSTRUCTION), abs=1e-6)
    assert encode(loader, task_metadata=retrieval.metadata, prompt_type=mteb.types.PromptType.document, **kw) == \
        pytest.approx(embedder.encode_documents(texts), abs=1e-6)
    assert encode(loader, task_metadata=sts.metadata, prompt_type=None, **kw) == \
        pytest.approx(embedder.encode(texts, instruction="Retrieve semantically similar text."), abs=1e-6)
    with_prompt = retrieval.metadata.model_copy(update={"prompt": {"query": "Find the passage"}})
    assert encode(loader, task_metadata=with_prompt, prompt_type=mteb.types.PromptType.query, **kw) == \
        pytest.approx(embedder.encode_queries(texts, instruction="Find the passage"), abs=1e-6)
    plain = MtebEncoder(embedder)
    assert plain.encode(loader, task_metadata=sts.metadata, prompt_type=None, **kw) == \
        pytest.approx(embedder.encode(texts), abs=1e-6)
