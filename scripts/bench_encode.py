"""Encoding speed: llm2emb vs sentence-transformers on the same model, texts, dtype and device, in one process.

Both encoders load the same converted folder (bidirectional, `is_causal: false`); the sentence-transformers
model is Transformer + Pooling + Normalize built here, with its modality pinned to plain text so a chat template
in the folder is not applied, and the script checks both attend bidirectionally and give the same embeddings
before timing. Timed rounds alternate the systems (order flipped every round) and report the median.
MFU = 2 x non-embedding parameters x real tokens / time / peak, where the peak is a matmul measured in this run
on the same device and dtype (the attention's own FLOPs are left out, so MFU is a slight underestimate).

    python -m scripts.bench_encode --model /tmp/smol-emb --limit 300
    python -m scripts.bench_encode --model DIR --device cuda --dtype bfloat16 --backends auto --st-attn flash_attention_2
    python -m scripts.bench_encode --model DIR --limit 200 --backends padded,packed --layers 10,20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llm2emb import Embedder
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.backbone import verify_attention
from llm2emb.readers import document_text

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/smol-emb", help="llm2emb model folder (llm2emb convert --base smollm2-135m)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="BEIR folder whose corpus.jsonl is encoded")
    p.add_argument("--limit", type=int, help="first N documents of the corpus")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch, both systems")
    p.add_argument("--max-tokens", type=int, help="llm2emb token budget per batch (batch-size still caps rows)")
    p.add_argument("--max-length", type=int, default=512, help="truncation, both systems")
    p.add_argument("--backends", default="auto", help="llm2emb attention backends to time, comma-separated")
    p.add_argument("--layers", default="", help="also time llm2emb with only the first K layers: K[,K...]")
    p.add_argument("--st-attn", default="sdpa", help="sentence-transformers attn_implementation (flash_attention_2 "
                                                     "makes it unpad on a GPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here too")
    return p.parse_args()


def load_texts(data: Path, limit: int | None) -> list[str]:
    texts = []
    with open(data / "corpus.jsonl") as f:
        for line in f:
            texts.append(document_text(json.loads(line)))
            if limit is not None and len(texts) >= limit:
                break
    return texts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 12) -> float:
    """Best FLOP/s of a large square matmul on this device and dtype: the MFU denominator.

    The best, not the median, of the repeats: on a shared machine the median reads other jobs' load as a lower peak.
    """
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[2:])


def build_sentence_transformer(folder: str, embedder: Embedder, device: str, dtype: torch.dtype, attn: str):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if embedder.pooler.name not in ("mean", "last_token"):
        raise SystemExit(f"pooling {embedder.pooler.name!r} has no sentence-transformers Pooling equivalent")
    transformer = Transformer(
        folder,
        model_kwargs={"dtype": dtype, "attn_implementation": attn},
        max_seq_length=embedder.config.max_length,
        # Plain text, as llm2emb tokenizes it: a folder with a chat template would otherwise be rendered as messages.
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    mode = "lasttoken" if embedder.pooler.name == "last_token" else "mean"
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=mode), Normalize()],
        device=device,
    )
    if transformer.auto_model.config.is_causal is not False:
        raise SystemExit("sentence-transformers loaded the backbone causal; both must compute the same thing")
    # A causal-sink folder: plain transformers attends from the first token too, so sentence-transformers' backbone
    # gets llm2emb's attention function, or the two would not compute the same thing (the timing then includes it).
    set_causal_sink(transformer.auto_model, embedder.config.causal_sink)
    verify_attention(transformer.auto_model, "bidirectional", causal_sink=embedder.config.causal_sink)
    return model


def padding_ratio(lengths: list[int], batch_size: int, sort: bool) -> float:
    """Share of padded slots in fixed-size batches (rows x longest), in file order or sorted by length."""
    lengths = sorted(lengths, reverse=True) if sort else list(lengths)
    slots = sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
                for i in range(0, len(lengths), batch_size))
    return 1 - sum(lengths) / slots


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    texts = load_texts(Path(args.data), args.limit)

    embedders = {}
    for backend in args.backends.split(","):
        embedders[backend] = Embedder.from_pretrained(
            args.model, torch_dtype=dtype, device=device, attention_backend=backend
        )
        embedders[backend].config.max_length = args.max_length
    reference = next(iter(embedders.values()))
    st = build_sentence_transformer(args.model, reference, args.device, dtype, args.st_attn)
    st.max_seq_length = args.max_length

    lengths = [len(row.ids) for row in reference.prompt_tokenizer.rows(texts, None, args.max_length, "document")]
    corpus = load_texts(Path(args.data), None)
    corpus_lengths = [len(ids) for ids in reference.tokenizer(corpus, truncation=True, max_length=args.max_length)["input_ids"]]
    tokens = sum(lengths)
    backbone = reference.backbone
    params = sum(p.numel() for p in backbone.parameters())
    non_embedding = params - backbone.get_input_embeddings().weight.numel()

    def run_llm2emb(embedder, layers=None):
        return lambda batch: embedder.encode_documents(
            batch, batch_size=args.batch_size, max_tokens=args.max_tokens, layers=layers, show_progress_bar=False
        )

    def run_st(batch):
        return st.encode(batch, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)

    systems = {"sentence-transformers": run_st}
    for backend, embedder in embedders.items():
        systems[f"llm2emb[{backend}:{embedder.attention_kernel}]"] = run_llm2emb(embedder)
    layer_counts = [int(k) for k in args.layers.split(",") if k]
    for k in layer_counts:
        systems[f"llm2emb[{args.backends.split(',')[0]}] layers={k}"] = run_llm2emb(reference, k)

    # Same embeddings from every backend before any timing (the first texts, which include the longest in file order).
    check = texts[: min(len(texts), 64)]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    theirs = run_st(check)
    differences = {}
    for backend, embedder in embedders.items():
        differences[backend] = float(np.abs(run_llm2emb(embedder)(check) - theirs).max())
        if differences[backend] > tolerance:
            raise SystemExit(f"llm2emb[{backend}:{embedder.attention_kernel}] and sentence-transformers disagree: "
                             f"max |diff| {differences[backend]:.2e} > {tolerance}")

    peaks = [peak_flops(device, dtype)]
    for run in systems.values():  # warm-up (allocator, kernels, thread pools)
        run(texts[: args.batch_size])
    timings = {name: [] for name in systems}
    names = list(systems)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            systems[name](texts)
            sync(device)
            timings[name].append(time.perf_counter() - start)
        peaks.append(peak_flops(device, dtype))  # between rounds too, so the peak sees the same machine state
    peak = max(peaks)

    st_time = statistics.median(timings["sentence-transformers"])
    full_time = statistics.median(timings[names[1]])
    results = []
    for name in names:
        seconds = statistics.median(timings[name])
        layers = int(name.split("layers=")[1]) if "layers=" in name else None
        layer_share = layers / reference.num_layers if layers else 1.0
        flops = 2 * non_embedding * layer_share * tokens
        results.append({
            "system": name, "median_s": round(seconds, 3), "rounds_s": [round(t, 3) for t in timings[name]],
            "tokens_per_s": round(tokens / seconds, 1), "speedup_vs_st": round(st_time / seconds, 3),
            "speedup_vs_full_llm2emb": round(full_time / seconds, 3), "mfu": round(flops / seconds / peak, 4),
        })

    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                   f"{torch.get_num_threads()}" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                                                     else ""),
        "versions": _versions(),
        "model": args.model, "parameters": params, "non_embedding_parameters": non_embedding,
        "layers": reference.num_layers, "device": str(device), "dtype": args.dtype, "texts": len(texts),
        "tokens": tokens, "batch_size": args.batch_size, "max_tokens": args.max_tokens, "max_length": args.max_length,
        "padding_ratio_file_order": round(padding_ratio(lengths, args.batch_size, sort=False), 4),
        "padding_ratio_length_sorted": round(padding_ratio(lengths, args.batch_size, sort=True), 4),
        "corpus_texts": len(corpus), "corpus_mean_tokens": round(sum(corpus_lengths) / len(corpus_lengths), 1),
        "corpus_padding_ratio_file_order": round(padding_ratio(corpus_lengths, args.batch_size, sort=False), 4),
        "corpus_padding_ratio_length_sorted": round(padding_ratio(corpus_lengths, args.batch_size, sort=True), 4),
        "max_abs_diff_vs_st": differences, "causal_sink": reference.config.causal_sink,
        "peak_tflops_matmul": round(peak / 1e12, 4),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import sentence_transformers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence-transformers": sentence_transformers.__version__}


if __name__ == "__main__":
    main()
