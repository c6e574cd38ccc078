"""Why `--int8` keeps the MLP's down projections in fp32: each way of quantizing an export's fp32 graph, scored by the
cosine of its vectors to the fp32 graph's on SciFact abstracts (onnxruntime's dynamic quantization: the default
per-tensor weights, per-channel weights, with and without the down projections).

    python -m scripts.int8_variants --model runs/q/smol-sink --export runs/q/smol-sink-onnx --texts 48 --json benchmarks/int8_variants.json
    python -m scripts.int8_variants --report benchmarks/int8_variants.json --results-block int8-variants
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {"per-tensor (onnxruntime's default)": {}, "per-channel": {"per_channel": True},
            "per-tensor, down projections fp32": {"down": True},
            "per-channel, down projections fp32 (`--int8`)": {"per_channel": True, "down": True}}


def measure(args) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from llm2emb.commands.export_onnx import GRAPH_NAME, INT8_NAME, OnnxEncoder, down_projections, row_cosines
    from llm2emb.readers import read_jsonl

    export = Path(args.export)
    texts = [row["text"] for row in read_jsonl(DATA / "scifact" / "corpus.jsonl", ("text",))[:args.texts]]
    exact = OnnxEncoder(export, threads=args.threads, max_length=args.max_length).encode(texts)
    intermediate = json.loads((Path(args.model) / "config.json").read_text())["intermediate_size"]
    down = down_projections(export / GRAPH_NAME, intermediate)
    rows = []
    for name, options in VARIANTS.items():
        with tempfile.TemporaryDirectory(dir=export.parent) as scratch:
            copy = Path(scratch)
            for item in export.iterdir():  # the tokenizer and settings beside a fresh int8 graph
                if item.name != INT8_NAME:
                    (copy / item.name).symlink_to(item.resolve())
            quantize_dynamic(str(export / GRAPH_NAME), str(copy / INT8_NAME), weight_type=QuantType.QInt8,
                             per_channel=options.get("per_channel", False),
                             nodes_to_exclude=down if options.get("down") else None)
            vectors = OnnxEncoder(copy, graph=INT8_NAME, threads=args.threads, max_length=args.max_length).encode(texts)
        cosine = row_cosines(exact, vectors)
        rows.append({"variant": name, "min_cosine": round(float(cosine.min()), 4),
                     "mean_cosine": round(float(cosine.mean()), 4), "fp32_matmuls": len(down) if options.get("down") else 0})
        print(json.dumps(rows[-1]), flush=True)
    return {"export": str(export), "texts": len(texts), "max_length": args.max_length, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__}


def table(report: dict) -> str:
    lines = [f"`{report['export']}`, {report['texts']} SciFact abstracts at up to {report['max_length']} tokens; "
             f"onnxruntime {report['onnxruntime']}, {report['machine']}, {report['date']}.", "",
             "| int8 variant | MatMuls left fp32 | min cosine to fp32 | mean cosine to fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['fp32_matmuls']} | {r['min_cosine']:.4f} | {r['mean_cosine']:.4f} |"
              for r in report["rows"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the llm2emb folder that was exported (its config.json gives the MLP's width)")
    p.add_argument("--export", help="its `llm2emb export --format onnx` folder")
    p.add_argument("--texts", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--report")
    p.add_argument("--results-block", metavar="NAME")
    args = p.parse_args(argv)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    elif args.export and args.model:
        report = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    else:
        p.error("--model and --export, or --report, are required")
    from scripts.results_block import publish

    publish(table(report), args.results_block)


if __name__ == "__main__":
    main()
