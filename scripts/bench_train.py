"""Training speed and memory: llm2emb's GradCache step vs sentence-transformers' CachedMultipleNegativesRankingLoss.

Same converted folder, same LoRA (or full fine-tune with --lora 0), same triplets (SNLI's JSONL, or a BEIR folder's
train claims with their abstracts: long texts that keep a GPU busy), same effective batch and
mini-batch, same temperature (1/20), same AdamW; the systems alternate step by step in one process (order flipped
every step) and the median step counts. llm2emb's step is what `ContrastiveTrainer.training_step` runs:
`gradcache_backward` over an `Embedder` (packed chunks when its attention backend is packed) with `InfoNCELoss`.
The first step's losses must agree (same model, same batch, same loss), which proves both compute the same thing.

Peak memory of a step: on CUDA `max_memory_allocated` above the allocation before the step; on a CPU (Linux) the
peak resident set size (VmHWM, reset through /proc/self/clear_refs before the step) above the RSS before it, after
returning freed heap to the OS (malloc_trim), so the system that runs second does not hide in the first one's freed
pages. (A sampling thread was tried first: on a loaded machine its GIL hand-offs slowed the steps many times over.)

    python -m scripts.bench_train --model /tmp/smol-emb --batch-size 32 --mini-batch 8 --steps 3
    python -m scripts.bench_train --model DIR --device cuda --dtype bfloat16 --data ../shared/data/scifact \
        --batch-size 512 --mini-batch 128 --max-length 256
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model, prepare_model_for_kbit_training

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.evaluate.data import load_beir
from llm2emb.model.attention import set_causal_sink
from llm2emb.model.backbone import quantization_config, verify_attention
from llm2emb.train.data import text_id
from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.losses import InfoNCELoss

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli" / "triplets.jsonl"
SCALE = 20.0
"""sentence-transformers' default MNRL scale; llm2emb's temperature is set to its inverse."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/smol-emb", help="llm2emb model folder")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="JSONL of query / positive / negative, or a BEIR folder (its train split; see beir_triplets)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32, help="effective contrastive batch (triplets per step)")
    p.add_argument("--mini-batch", type=int, default=8, help="GradCache chunk / CMNRL mini_batch_size")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora", type=int, default=16, help="LoRA rank on every linear layer of both; 0 = full fine-tune")
    p.add_argument("--quantization", default="none", choices=["none", "4bit"],
                   help="4bit: QLoRA, both bases loaded NF4 through bitsandbytes (CUDA) and prepared for k-bit "
                        "training as llm2emb's trainer does; needs --lora")
    p.add_argument("--backend", default="auto", help="llm2emb attention backend")
    p.add_argument("--st-attn", default="sdpa", help="sentence-transformers attn_implementation")
    p.add_argument("--steps", type=int, default=3, help="timed steps per system (after one warm-up step)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    if args.quantization != "none" and not args.lora:
        p.error("--quantization 4bit trains a LoRA adapter on the quantized base: give --lora RANK")
    return args


def beir_triplets(directory: Path, count: int, batch_size: int) -> list[dict]:
    """`count` rows of (train query, one of its relevant documents, a document no pair uses), cycling through
    the pairs. No query text or document recurs among the pairs, and a batch may not outgrow them (SciFact gives 521),
    so no text appears twice in a batch: sentence-transformers would score a repeat as a negative, llm2emb masks it,
    and the first-step losses would then differ."""
    data = load_beir(directory, split="train")
    text = dict(zip(data.doc_ids, data.documents, strict=True))
    query = dict(zip(data.query_ids, data.queries, strict=True))
    pairs, used_queries, used_documents = [], set(), set()
    for query_id, relevant in data.qrels.items():
        document = next((doc for doc in relevant if doc not in used_documents), None)
        if document is None or query[query_id] in used_queries:
            continue
        used_queries.add(query[query_id])
        used_documents.add(document)
        pairs.append((query[query_id], text[document]))
    if batch_size > len(pairs):
        raise SystemExit(f"{directory}: --batch-size {batch_size} exceeds its {len(pairs)} distinct train pairs")
    negatives = [text[doc] for doc in data.doc_ids if doc not in used_documents]
    return [{"query": pairs[i % len(pairs)][0], "positive": pairs[i % len(pairs)][1],
             "negative": negatives[i % len(negatives)]} for i in range(count)]


def load_triplets(path: Path, count: int, batch_size: int) -> list[dict]:
    if path.is_dir():
        return beir_triplets(path, count, batch_size)
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= count:
                break
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _high_water_mark() -> int:
    """Peak resident set size of this process since the last reset (Linux /proc), in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device, out: list[int]):
    """Append the step's peak memory above its starting point (bytes) to `out`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        sync(device)
        out.append(torch.cuda.max_memory_allocated(device) - start)
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    start = psutil.Process().memory_info().rss
    yield
    out.append(_high_water_mark() - start)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")


def quantized(args) -> bool:
    return args.quantization != "none"


def build_llm2emb(args, device, dtype):
    embedder = Embedder.from_pretrained(args.model, torch_dtype=dtype, device=device, attention_backend=args.backend,
                                        quantization=args.quantization if quantized(args) else None)
    embedder.config.max_length = args.max_length
    embedder.backbone.config.use_cache = False
    if quantized(args):
        embedder.backbone = prepare_model_for_kbit_training(embedder.backbone, use_gradient_checkpointing=False)
    if args.lora:
        torch.manual_seed(0)
        embedder.backbone = get_peft_model(embedder.backbone, lora_config(args.lora))
    loss = InfoNCELoss(temperature=1.0 / SCALE, gather_across_devices=False)
    optimizer = torch.optim.AdamW(trainable(embedder), lr=args.lr)

    def step(rows: list[dict]) -> float:
        queries = embedder.tokenize([r["query"] for r in rows])
        documents = embedder.tokenize([r["positive"] for r in rows] + [r["negative"] for r in rows], kind="document")
        query_ids = torch.tensor([text_id(r["query"]) for r in rows])
        document_ids = torch.tensor([text_id(r["positive"]) for r in rows] + [text_id(r["negative"]) for r in rows])
        embedder.train()
        value = gradcache_backward(
            embedder, [queries, documents],
            lambda e: loss(e[0], e[1], query_ids.to(device), document_ids.to(device)), args.mini_batch,
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    def tokens(rows: list[dict]) -> int:
        texts = [r[k] for k in ("query", "positive", "negative") for r in rows]
        return sum(len(row.ids) for row in embedder.prompt_tokenizer.rows(texts, None, args.max_length, "document"))

    return embedder, step, tokens


def build_sentence_transformers(args, device, dtype, causal_sink: bool):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model_kwargs = {"dtype": dtype, "attn_implementation": args.st_attn}
    if quantized(args):  # the same NF4 config llm2emb loads with, placed by bitsandbytes as llm2emb's is
        model_kwargs["quantization_config"] = quantization_config(args.quantization, dtype)
        model_kwargs["device_map"] = {"": str(device)}
    transformer = Transformer(
        args.model, model_kwargs=model_kwargs, max_seq_length=args.max_length,
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    if transformer.auto_model.config.is_causal is not False:
        raise SystemExit("sentence-transformers loaded the backbone causal; both must compute the same thing")
    transformer.auto_model.config.use_cache = False
    # A causal-sink folder (random_model converts with llm2emb's defaults): plain transformers would attend from
    # the first token too, and the first-step losses could not agree.
    set_causal_sink(transformer.auto_model, causal_sink)
    verify_attention(transformer.auto_model, "bidirectional", causal_sink=causal_sink)
    if quantized(args):
        transformer.auto_model = prepare_model_for_kbit_training(transformer.auto_model, use_gradient_checkpointing=False)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device=str(device))
    if args.lora:
        torch.manual_seed(0)
        # peft's own injection: transformers' add_adapter insists on a newer peft than the registry has.
        inject_adapter_in_model(lora_config(args.lora), transformer.auto_model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "lora_" in name
    loss = CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=args.mini_batch)
    optimizer = torch.optim.AdamW(trainable(model), lr=args.lr)

    def step(rows: list[dict]) -> float:
        features = []
        for key in ("query", "positive", "negative"):
            feature = model.preprocess([r[key] for r in rows])
            features.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in feature.items()})
        model.train()
        value = loss(features, None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    return model, step


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = load_triplets(Path(args.data), args.batch_size * (args.steps + 1), args.batch_size)
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    embedder, llm2emb_step, count_tokens = build_llm2emb(args, device, dtype)
    st_model, st_step = build_sentence_transformers(args, device, dtype, embedder.config.causal_sink)
    systems = {"llm2emb": llm2emb_step, "sentence-transformers": st_step}

    timings = {name: [] for name in systems}
    memory = {name: [] for name in systems}
    losses = {name: [] for name in systems}
    names = list(systems)
    for index, batch in enumerate(batches):
        for name in names if index % 2 == 0 else names[::-1]:
            with peak_memory(device, memory[name]):
                sync(device)
                start = time.perf_counter()
                losses[name].append(systems[name](batch))
                sync(device)
                timings[name].append(time.perf_counter() - start)
            print(f"step {index} {name}: {timings[name][-1]:.1f} s, loss {losses[name][-1]:.4f}", file=sys.stderr)
    first = {name: values[0] for name, values in losses.items()}
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if abs(first["llm2emb"] - first["sentence-transformers"]) > tolerance * max(1.0, abs(first["llm2emb"])):
        raise SystemExit(f"first-step losses differ: {first}; the two systems do not compute the same loss")

    tokens = [count_tokens(batch) for batch in batches]
    results = []
    for name in names:
        seconds = timings[name][1:]  # the first step (warm-up: optimizer state, allocator) is not counted
        rates = [n / s for n, s in zip(tokens[1:], seconds, strict=True)]
        results.append({
            "system": name, "step_s": [round(s, 2) for s in seconds], "median_step_s": round(statistics.median(seconds), 3),
            "tokens_per_s": round(statistics.median(rates), 1),
            "peak_memory_mib": round(max(memory[name][1:]) / 2**20, 1),
            "losses": [round(v, 4) for v in losses[name]],
        })
    ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    trainable_params = sum(p.numel() for p in trainable(embedder))
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "versions": _versions(),
        "model": args.model, "device": str(device), "dtype": args.dtype, "lora_rank": args.lora,
        "quantization": args.quantization,
        "trainable_parameters": trainable_params, "attention_backend": f"{args.backend}:{embedder.attention_kernel}",
        "batch_size": args.batch_size, "mini_batch": args.mini_batch, "max_length": args.max_length,
        "timed_steps": args.steps, "tokens_per_step": tokens[1:],
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) above step start",
        "results": results, "tokens_per_s_ratio_llm2emb_over_st": round(ratio, 3),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import peft
    import sentence_transformers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence-transformers": sentence_transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # no GPU for --quantization, a folder that does not load: one line
        raise SystemExit(f"bench_train: {error}") from None
