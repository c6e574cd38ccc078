"""Same model, three harnesses: `llm2emb eval`, sentence-transformers (the exported folder) and mteb agree on STS-B.

Builds comparison row (c) of scripts/compare_baselines.py (SmolLM2-135M, bidirectional, mean pooling, untrained),
exports it with `llm2emb export --format sentence-transformers`, and scores the first N pairs of STS-B test four
ways: llm2emb's evaluator on the Embedder and on the exported SentenceTransformer, and mteb on `MtebEncoder` and on
the exported SentenceTransformer (mteb's own wrapper), with a local mteb task read from a file (no hub). The
result goes to benchmarks/baselines/agreement/ and into the table of benchmarks/RESULTS.md:

    python scripts/check_agreement.py --pairs 300
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_baselines import DATA, OUT, render, update_results  # noqa: E402


def local_sts_task(path: Path):
    """An mteb STS task over a TSV file (score, sentence1, sentence2)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSTSB(AbsTaskSTS):
        metadata = TaskMetadata(
            type="STS", name="LocalSTSB", main_score="cosine_spearman", description="STS-B test pairs from a file.",
            reference="https://ixa2.si.ehu.eus/stswiki", dataset={"path": "local", "revision": "local"},
            category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2017-01-01", "2017-01-01"),
            dialect=["Written"], domains=[], task_subtypes=[], license="not specified", annotations_creators="human-annotated",
            modalities=["text"], sample_creation="found", bibtex_citation="",
        )
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                "score": [float(r["score"]) for r in rows]})})
            self.data_loaded = True

    return LocalSTSB()


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="first N pairs of STS-B test")
    parser.add_argument("--base", default="smollm2-135m", help="base model of row (c) (default: the SmolLM2 asset)")
    args = parser.parse_args()

    import mteb
    from sentence_transformers import SentenceTransformer

    from llm2emb.commands.export import export_sentence_transformers
    from llm2emb.evaluate import load_sts
    from llm2emb.evaluate.runner import environment, evaluate_model
    from llm2emb.integrations.mteb import MtebEncoder
    from llm2emb.model.embedder import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = (DATA / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()[: args.pairs + 1]
        subset = tmp / "stsb-test.tsv"
        subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        data = load_sts(subset)

        embedder = Embedder.from_pretrained(args.base, pooling="mean", attention="bidirectional")
        embedder.save_pretrained(tmp / "model")
        exported = export_sentence_transformers(tmp / "model", tmp / "st")
        st = SentenceTransformer(str(exported), device="cpu")

        def ours(model):
            return evaluate_model(model, sts=[data], use_cache=False).results[0].scores["spearman"]

        def through_mteb(model):
            result = mteb.evaluate(model, local_sts_task(subset), cache=None, show_progress_bar=False)
            return 100 * result.task_results[0].scores["test"][0]["cosine_spearman"]

        runs = {
            "llm2emb eval, Embedder": lambda: ours(embedder),
            "llm2emb eval, exported SentenceTransformer": lambda: ours(st),
            "mteb, MtebEncoder(Embedder)": lambda: through_mteb(MtebEncoder(embedder)),
            "mteb, exported SentenceTransformer": lambda: through_mteb(st),
        }
        scores = {}
        for name, run in runs.items():
            value, seconds = timed(run)
            scores[name] = {"spearman": value, "seconds": seconds}
            print(f"{name}: {value:.4f} ({seconds:.0f} s)", flush=True)

    record = {"row": "c", "base": args.base, "task": f"STS-B test, first {len(data.scores)} pairs", "scores": scores,
              "environment": environment(), "command": "python scripts/check_agreement.py " + " ".join(sys.argv[1:])}
    (OUT / "agreement").mkdir(parents=True, exist_ok=True)
    (OUT / "agreement" / "row-c.json").write_text(json.dumps(record, indent=2) + "\n")
    update_results(render())


if __name__ == "__main__":
    main()
