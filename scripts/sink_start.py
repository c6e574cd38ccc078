"""Where training starts: an untrained base's STS-B dev score, contrastive loss and spread per attention mode.

The causal sink (llm2emb.model.attention) was found here: a plainly bidirectional SmolLM2-135M starts far below its causal
self and above chance loss, the sink-kept one above both. Each mode is the same converted weights; `future=w` rows are
the plainly bidirectional model with attention to later tokens scaled by w (the `bidirectional_warmup` curriculum's
first steps). Writes one JSON row per mode to --out and, with --results-block, the table into benchmarks/RESULTS.md.

    python -m scripts.sink_start --base smollm2-135m --out benchmarks/sink_start.json --results-block sink-start
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = ["causal", "bidirectional", "sink", "future=0.0001", "future=0.001", "future=0.01", "future=0.1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a base model (hub id, folder, .gguf or asset alias)")
    p.add_argument("--out", required=True, help="JSON rows written here (read back with --report)")
    p.add_argument("--report", action="store_true", help="only render --out's rows")
    p.add_argument("--batches", type=int, default=8, help="SNLI batches of 16 triplets for the loss (the first rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-block", metavar="NAME", help="also write the table into benchmarks/RESULTS.md")
    return p.parse_args(argv)


def load(base: str, mode: str):
    import torch

    from llm2emb import Embedder

    if mode == "causal":
        return Embedder.from_pretrained(base, attention="causal", torch_dtype=torch.float32)
    embedder = Embedder.from_pretrained(base, torch_dtype=torch.float32, causal_sink=mode == "sink")
    if mode.startswith("future="):
        embedder.set_future_attention(float(mode.split("=", 1)[1]))
        embedder.set_attention_backend("padded")  # the curriculum's bias runs on padded batches
    return embedder


def contrastive_start(embedder, triplets: list[dict]) -> tuple[float, float, float]:
    """Mean InfoNCE loss (temperature 0.05, in-batch and one hard negative per row, as the default recipe trains),
    its chance level, and the mean cosine between different query texts, over batches of 16."""
    import torch

    from llm2emb.model.spread import mean_cosine
    from llm2emb.train.losses import InfoNCELoss

    loss_fn = InfoNCELoss(temperature=0.05, gather_across_devices=False)
    losses, chances, cosines = [], [], []
    for start in range(0, len(triplets) - 15, 16):
        rows = triplets[start:start + 16]
        with torch.no_grad():
            queries = embedder.forward(embedder.tokenize([r["query"] for r in rows]))
            documents = embedder.forward(embedder.tokenize([r["positive"] for r in rows] + [r["negative"] for r in rows]))
        ids = torch.arange(16)
        losses.append(loss_fn(queries, documents, ids, torch.cat([ids, ids + 16])).item())
        chances.append(loss_fn.chance.item())
        cosines.append(mean_cosine(queries).item())
    count = len(losses)
    return sum(losses) / count, sum(chances) / count, sum(cosines) / count


def measure(args) -> list[dict]:
    import torch
    import transformers

    from llm2emb.evaluate import load_sts
    from llm2emb.evaluate.sts import evaluate_sts

    torch.set_num_threads(args.threads)
    sts = load_sts(DATA / "stsb" / "dev.tsv")
    lines = (DATA / "snli" / "triplets.jsonl").read_text().splitlines()[:16 * args.batches]
    triplets = [json.loads(line) for line in lines]
    rows = []
    for mode in MODES:
        started = time.perf_counter()
        embedder = load(args.base, mode).eval()
        embedder.config.max_length = 64
        loss, chance, cosine = contrastive_start(embedder, triplets)
        embedder.config.max_length = 256
        score = evaluate_sts(embedder, sts, batch_size=64).main
        rows.append({"mode": mode, "stsb-dev": round(score, 2), "loss": round(loss, 3), "chance_loss": round(chance, 3),
                     "embedding_cosine": round(cosine, 3), "seconds": round(time.perf_counter() - started, 1),
                     "base": args.base, "triplets": len(triplets), "torch": torch.__version__,
                     "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
                     "threads": args.threads, "date": time.strftime("%Y-%m-%d")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    first = rows[0]
    threads = f"{first['threads']} thread" + ("s" if first["threads"] > 1 else "")
    lines = [f"Untrained `{first['base']}`, float32, {threads}, torch {first['torch']}, transformers "
             f"{first['transformers']}, {first['date']}; the loss over the first {first['triplets']} SNLI triplets in "
             "batches of 16 (max_length 64), STS-B dev at 256 tokens.", "",
             "| attention | STS-B dev | contrastive loss (chance) | mean cosine between queries |", "|---|---|---|---|"]
    names = {"causal": "causal", "bidirectional": "bidirectional (plain)", "sink": "bidirectional, causal sink"}
    for row in rows:
        mode = row["mode"]
        name = names.get(mode, f"plain bidirectional, later tokens x {mode.split('=', 1)[-1]}")
        lines.append(f"| {name} | {row['stsb-dev']:.2f} | {row['loss']:.2f} ({row['chance_loss']:.2f}) | "
                     f"{row['embedding_cosine']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    else:
        if not args.base:
            raise SystemExit("--base is required unless --report is given")
        rows = measure(args)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from scripts.results_block import publish

    publish(table(rows), args.results_block)


if __name__ == "__main__":
    main()
