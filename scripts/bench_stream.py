"""Peak memory of `llm2emb encode` as the corpus grows: streamed (chunks into a memory-mapped file) against holding
every text, as `Embedder.encode` on the whole list does.

The corpus is SciFact's abstracts repeated to 10k and 100k texts (256 tokens each at most); the model is the
`tiny-llama` shape of scripts/random_model.py (SmolLM2's tokenizer, 2 small layers), so that the corpus, not the
weights, sets the memory. Each measurement runs in a fresh process and reports its peak RSS.

    python -m scripts.bench_stream --tokenizer runs/q/smol-bi --sizes 10000 100000 --out benchmarks/stream.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"

MEASURE = """
import resource, sys, time, json
import numpy as np
mode, model, corpus, out = sys.argv[1:5]
started = time.perf_counter()
if mode == "streamed":
    from llm2emb.cli import main
    assert main(["encode", model, "--input", corpus, "--output", out, "--documents", "--quiet",
                 "--batch-size", "64"]) == 0
else:
    from llm2emb import Embedder
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    np.save(out, Embedder.from_pretrained(model).encode_documents(texts, batch_size=64, show_progress_bar=False))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mib": round(peak, 1), "seconds": round(time.perf_counter() - started, 1)}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a model folder whose tokenizer to use (SmolLM2's)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--modes", nargs="+", default=["streamed", "in-memory"], choices=["streamed", "in-memory"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    from scripts.random_model import make

    abstracts = [json.loads(line)["text"] for line in SCIFACT.open(encoding="utf-8")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make("tiny-llama", Path(args.tokenizer), tmp / "model", dtype="float32")
        config = json.loads((model / "llm2emb.json").read_text())
        config["max_length"] = args.max_length
        (model / "llm2emb.json").write_text(json.dumps(config))
        for size in args.sizes:
            corpus = tmp / f"corpus-{size}.jsonl"
            with corpus.open("w", encoding="utf-8") as handle:
                for i in range(size):
                    handle.write(json.dumps({"_id": str(i), "text": abstracts[i % len(abstracts)]}) + "\n")
            for mode in args.modes:
                run = subprocess.run([sys.executable, "-c", MEASURE, mode, str(model), str(corpus), str(tmp / "e.npy")],
                                     capture_output=True, text=True, cwd=ROOT)
                if run.returncode:
                    raise SystemExit(run.stderr[-2000:])
                result = {"texts": size, "mode": mode, **json.loads(run.stdout.strip().splitlines()[-1])}
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
