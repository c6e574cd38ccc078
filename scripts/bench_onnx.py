"""CPU encode speed of an ONNX export beside llm2emb's torch path and sentence-transformers, in one run, with the
vectors checked first: ONNX Runtime fp32 and int8 (`llm2emb export --format onnx --int8`), the same two files
compiled by OpenVINO (when installed), llm2emb (its default attention backend), and sentence-transformers on the same weights (given the causal sink when the folder has it, as
scripts/bench_encode.py does). Rounds alternate the order of the systems.

    python -m scripts.bench_onnx --model runs/q/smol-sink --export runs/q/smol-sink-onnx --texts 256 \
        --json benchmarks/onnx_cpu.json [--quality --corpus-sample 1000]
    python -m scripts.bench_onnx --report benchmarks/onnx_cpu.json --results-block onnx-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="llm2emb model folder")
    p.add_argument("--export", help="its ONNX export (made here with --int8 when the folder does not exist yet)")
    p.add_argument("--texts", type=int, default=256, help="first N SciFact abstracts to encode")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="threads for every system")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality", action="store_true",
                   help="also score ONNX Runtime fp32 and int8 on STS-B test and SciFact test: what int8 costs (fp32 "
                        "equals llm2emb's vectors, so its scores are llm2emb's; OpenVINO runs the same int8 graph, "
                        "its vectors compared in the speed table)")
    p.add_argument("--corpus-sample", type=int, default=1000, help="--quality: SciFact documents kept")
    p.add_argument("--quality-only", action="store_true",
                   help="only the --quality scores (no timing, no torch or sentence-transformers model loaded: the "
                        "export's fp32 graph was checked against the Embedder to 1e-4 when it was written)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--report", help="only render this report")
    p.add_argument("--results-block", metavar="NAME")
    return p.parse_args(argv)


def runtimes() -> list[str]:
    """ONNX Runtime, and OpenVINO when it is installed (`pip install 'llm2emb[openvino]'`)."""
    import importlib.util

    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def measure_quality(args) -> dict:
    """The --quality-only report: each ONNX graph's scores, nothing timed. The report is rewritten after every
    system, so a run cut by a time limit keeps the systems it finished."""
    import onnxruntime

    from llm2emb.commands.export_onnx import INT8_NAME, OnnxEncoder

    encoders = {f"onnxruntime {precision}": OnnxEncoder(args.export, graph=graph, threads=args.threads,
                                                        max_length=args.max_length)
                for precision, graph in (("fp32", "model.onnx"), ("int8", INT8_NAME))}
    report = {"quality": [], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model, "export": str(args.export), "max_length": args.max_length,
              "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s) per system",
              "versions": {"onnxruntime": onnxruntime.__version__}}

    def keep(rows: list[dict]) -> None:
        report["quality"] = rows
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    quality(args, encoders, on_row=keep)
    return report


def measure(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from llm2emb import Embedder
    from llm2emb.commands.export_onnx import INT8_NAME, OnnxEncoder, export_onnx
    from llm2emb.readers import document_text
    from scripts.bench_encode import build_sentence_transformer

    torch.set_num_threads(args.threads)
    export = Path(args.export)
    if not export.exists():
        export_onnx(args.model, export, int8=True)
    lines = (DATA / "scifact" / "corpus.jsonl").read_text().splitlines()[: args.texts]
    texts = [document_text(json.loads(line)) for line in lines]
    embedder = Embedder.from_pretrained(args.model, torch_dtype=torch.float32)
    embedder.config.max_length = args.max_length
    onnx = {f"{runtime} {precision}": OnnxEncoder(export, graph=graph, threads=args.threads,
                                                  max_length=args.max_length, runtime=runtime)
            for runtime in runtimes() for precision, graph in (("fp32", "model.onnx"), ("int8", INT8_NAME))}
    systems = {
        f"llm2emb torch ({embedder.attention_kernel})":
            lambda batch: embedder.encode_documents(batch, batch_size=args.batch_size, show_progress_bar=False),
        **{name: (lambda batch, e=encoder: e.encode_documents(batch, batch_size=args.batch_size))
           for name, encoder in onnx.items()},
    }
    if embedder.pooler.name in ("mean", "last_token"):
        st = build_sentence_transformer(args.model, embedder, "cpu", torch.float32, "sdpa")
        st.max_seq_length = args.max_length
        systems["sentence-transformers"] = lambda batch: st.encode(batch, batch_size=args.batch_size,
                                                                  convert_to_numpy=True, show_progress_bar=False)
    vectors = {name: run(texts) for name, run in systems.items()}  # once each, before any timing
    reference = next(iter(vectors.values()))
    differences = {name: float(np.abs(v - reference).max()) for name, v in vectors.items()}
    cosines = {name: float((v * reference).sum(axis=1).min()) for name, v in vectors.items()}
    for name in (f"{runtime} fp32" for runtime in runtimes()):
        if differences[name] > 1e-4:
            raise SystemExit(f"{name} disagrees with llm2emb: max |diff| {differences[name]:.2e}")
    timings = {name: [] for name in systems}
    names = list(systems)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            systems[name](texts)
            timings[name].append(time.perf_counter() - started)
    tokens = sum(len(row.ids) for row in embedder.prompt_tokenizer.rows(texts, None, args.max_length, "document"))
    torch_time = statistics.median(timings[names[0]])
    import onnxruntime

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "onnxruntime": onnxruntime.__version__}
    if "openvino" in runtimes():
        import openvino

        versions["openvino"] = openvino.__version__
    scored = {name: onnx[name] for name in ("onnxruntime fp32", "onnxruntime int8")}
    return {
        **({"quality": quality(args, scored)} if args.quality else {}),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "export": str(export),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s) per system",
        "versions": versions,
        "texts": len(texts), "tokens": tokens, "max_length": args.max_length, "batch_size": args.batch_size,
        "results": [{"system": name, "median_s": round(statistics.median(timings[name]), 3),
                     "rounds_s": [round(t, 3) for t in timings[name]],
                     "tokens_per_s": round(tokens / statistics.median(timings[name]), 1),
                     "speedup_vs_llm2emb_torch": round(torch_time / statistics.median(timings[name]), 3),
                     "max_abs_diff_vs_llm2emb": differences[name], "min_cosine_vs_llm2emb": round(cosines[name], 6)}
                    for name in names],
    }


def quality(args, encoders: dict, on_row=None) -> list[dict]:
    """STS-B test Spearman and SciFact nDCG@10 (x100) of each encoder, with the seconds each took; `on_row` sees the
    rows so far after each encoder."""
    from llm2emb.evaluate import load_beir, load_sts
    from llm2emb.evaluate.data import subsample_corpus
    from llm2emb.evaluate.retrieval import evaluate_retrieval
    from llm2emb.evaluate.sts import evaluate_sts

    sts = load_sts(DATA / "stsb" / "test.tsv")
    scifact = subsample_corpus(load_beir(DATA / "scifact", "test"), args.corpus_sample)
    rows = []
    for name, encoder in encoders.items():
        started = time.perf_counter()
        rows.append({"system": name, "stsb": round(evaluate_sts(encoder, sts, batch_size=args.batch_size).main, 2),
                     "scifact": round(evaluate_retrieval(encoder, scifact, batch_size=args.batch_size).main, 2),
                     "documents": len(scifact.documents), "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if on_row:
            on_row(rows)
    return rows


def table(report: dict) -> str:
    if "results" not in report:  # --quality-only
        lines = [f"`{report['model']}` -> `{report['export']}`; max_length {report['max_length']}; "
                 f"{report['machine']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
                 + f"; {report['date']}."]
        return "\n".join(lines + quality_table(report))
    lines = [f"`{report['model']}` -> `{report['export']}`; {report['texts']} SciFact abstracts ({report['tokens']:,} "
             f"tokens, max_length {report['max_length']}, batches of {report['batch_size']}); {report['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + f"; {report['date']}.", "",
             "| system | median s | tokens/s | vs llm2emb torch | max abs diff vs llm2emb | min cosine vs llm2emb |",
             "|---|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['system']} | {row['median_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['speedup_vs_llm2emb_torch']:.2f}x | {row['max_abs_diff_vs_llm2emb']:.1e} | "
                     f"{row['min_cosine_vs_llm2emb']:.4f} |")
    return "\n".join(lines + quality_table(report))


def quality_table(report: dict) -> list[str]:
    lines = []
    if "quality" in report:
        fp32 = report["quality"][0]
        lines += ["", f"Quality (STS-B test Spearman, SciFact test nDCG@10 on {fp32['documents']:,} documents, x100; "
                  f"ONNX Runtime fp32 gives llm2emb's vectors, so its scores are llm2emb's):", "",
                  "| system | STS-B | SciFact | vs fp32 (STS-B / SciFact) |", "|---|---|---|---|"]
        for row in report["quality"]:
            lines.append(f"| {row['system']} | {row['stsb']:.2f} | {row['scifact']:.2f} | "
                         f"{row['stsb'] - fp32['stsb']:+.2f} / {row['scifact'] - fp32['scifact']:+.2f} |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        if not (args.model and args.export):
            raise SystemExit("--model and --export are required unless --report is given")
        if args.quality_only:
            args.quality = True
        report = measure_quality(args) if args.quality_only else measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    from scripts.results_block import publish

    publish(table(report), args.results_block)


if __name__ == "__main__":
    main()
