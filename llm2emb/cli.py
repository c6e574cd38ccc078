"""llm2emb: turn a decoder-only LLM into a text embedding model, train it with contrastive recipes, evaluate and export it.

The command line parses arguments and shows errors; each command calls the library. Each command has an
`add_<name>` function that declares its arguments and a `run_<name>` that calls the library (imported there, so
`--help` loads no torch). User errors (`UserError`) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llm2emb.devices import add_device_argument, pick_device
from llm2emb.errors import UserError
from llm2emb.retrieval.precision import PRECISIONS

EXIT_USAGE = 2


def _pooling_arg(text: str):
    """`mean` or a JSON object like `{"type": "latent_attention", "num_latents": 64}`."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--pooling: not valid JSON ({exc.msg})") from None
    return text


LOAD_DTYPES = ["float32", "bfloat16", "float16"]
LOAD_DTYPE_HELP = ("weights and activations (default: the folder's own); bfloat16 halves memory and is faster on GPUs "
                   "and on CPUs with bf16 instructions, at a small cost in precision")


# ---------------------------------------------------------------- convert
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a decoder into a bidirectional embedding model folder")
    p.add_argument("--base", required=True, help="hub id, HF folder, .gguf file, or an asset alias (smollm2-135m)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--pooling", default="mean", type=_pooling_arg,
                   help="mean | last_token | weighted_mean | latent_attention | multi_layer, or a JSON object")
    p.add_argument("--attention", default="bidirectional", choices=["bidirectional", "causal"])
    p.add_argument("--causal-sink", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each text's first token causal (the attention sink) in bidirectional attention "
                        "(default: on for bidirectional); --no-causal-sink attends as plain transformers does")
    p.add_argument("--text-template", metavar="TEMPLATE",
                   help="around every text: chat (the base's chat template around one user message) | turn (that user "
                        "turn alone, without a default system prompt) | bos (one leading BOS token, where the tokenizer "
                        "adds none) | none | a template with {text} (default: "
                        "bos with the causal sink, where the tokenizer has a token to lead with, else none); its tokens "
                        "are context, never pooled")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--query-instruction", help="default instruction for queries")
    p.add_argument("--rope-scaling", metavar="METHOD:FACTOR",
                   help="stretch RoPE for texts beyond the trained window: pi | ntk | yarn, e.g. yarn:4 (texts "
                        "within the window embed as before; raise --max-length to use it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(run=run_convert)


def run_convert(args) -> None:
    from llm2emb.commands.convert import convert

    embedder = convert(
        args.base, args.out, pooling=args.pooling, attention=args.attention, causal_sink=args.causal_sink,
        text_template=args.text_template,
        dtype=args.dtype, max_length=args.max_length, query_instruction=args.query_instruction,
        overwrite=args.overwrite, rope_scaling=args.rope_scaling,
    )
    window = embedder.rope_window
    extended = f", RoPE {embedder.config.rope_scaling['method']} beyond {window} tokens" if window else ""
    sink = " (first token causal: the sink)" if embedder.config.causal_sink else ""
    template = embedder.config.text_template
    wrapped = f", text template {template!r}" if template != "{text}" else ""
    print(f"wrote {args.out}: {embedder.config.attention}{sink} {embedder.pooler.name} pooling, dim {embedder.dim}"
          f"{extended}{wrapped}")


# ---------------------------------------------------------------- encode
def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="embed a text or JSONL file into a .npy matrix (streamed, resumable)")
    p.add_argument("model", help="llm2emb folder, or a base model with --pooling")
    p.add_argument("--input", required=True,
                   help="text file (one text per line, '-' for stdin) or JSONL (.jsonl/.json: --text-field, title)")
    p.add_argument("--output", required=True, help=".npy file to write (row i = line i, or JSONL record i)")
    p.add_argument("--instruction", help="instruction for every line (query template)")
    p.add_argument("--documents", action="store_true", help="encode as documents (document template)")
    p.add_argument("--pooling", type=_pooling_arg, help="pooling when MODEL is a base model")
    p.add_argument("--dtype", choices=LOAD_DTYPES, help=LOAD_DTYPE_HELP)
    p.add_argument("--text-field", default="text", help="JSONL: the field holding the text (default: text)")
    p.add_argument("--id-field", help="JSONL: write this field of every record to OUTPUT.ids.txt, line i for row i")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="texts read, encoded and written at a time; a killed run resumes after its last chunk")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, help="keep the first DIM components (Matryoshka)")
    p.add_argument("--layers", type=int, help="run only the first LAYERS transformer layers (Matryoshka layers)")
    p.add_argument("--max-tokens", type=int, help="token budget per batch (texts are sorted by length first)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "padded", "packed", "flash_attn", "varlen_attn"],
                   help="padded batches, or packed rows with a varlen kernel (auto: the fastest available)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="write compressed codes: float16, int8/uint8 (need --calibration), binary/ubinary (packed bits)")
    p.add_argument("--calibration", metavar="NPY",
                   help="int8/uint8: float embeddings of a sample (e.g. an earlier float32 encode), or a saved "
                        "OUTPUT.ranges.npy, whose per-dimension min and max set the levels")
    p.add_argument("--chunks", metavar="CHUNKER",
                   help="situated chunks: split every text (sentences | words:N) and write one row per chunk, each "
                        "embedded in its text's context; OUTPUT.chunks.jsonl maps rows to input rows and spans")
    p.add_argument("--window", type=int, help="--chunks: tokens per forward over a text (default: max_length)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_argument(p)
    p.set_defaults(run=run_encode)


def run_encode(args) -> None:
    import shutil

    from llm2emb.model.embedder import Embedder
    from llm2emb.retrieval.corpus import encode_corpus, scan, sidecar
    from llm2emb.train.distributed import launched_processes

    output = Path(args.output)
    ranges = None
    if args.calibration:
        import numpy as np

        from llm2emb.retrieval.precision import calibration_ranges

        if not Path(args.calibration).is_file():
            raise UserError(f"--calibration {args.calibration}: file not found")
        try:
            sample = np.load(args.calibration, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:  # truncated, not .npy, or an object array
            raise UserError(f"--calibration {args.calibration}: not a readable .npy matrix ({str(exc)[:120]})") from None
        ranges = calibration_ranges(sample)
    world = launched_processes()
    rank, barrier, device = 0, (lambda: None), pick_device(args.device)
    if world > 1:  # torchrun --nproc_per_node N: each process a share of the chunks, one output
        import torch.distributed as dist

        if args.input == "-":
            raise UserError("--input -: standard input cannot be split across processes; give a file")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, barrier = dist.get_rank(), dist.barrier
    source = Path(args.input)
    if args.input == "-":  # spooled to a file beside the output, so it is read in chunks like any input
        source = sidecar(output, "stdin.txt")
        output.parent.mkdir(parents=True, exist_ok=True)
        with source.open("wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
    try:
        if args.window is not None and not args.chunks:
            raise UserError("--window sizes the forwards of --chunks; give --chunks too")
        if args.window is not None and args.window < 2:
            raise UserError(f"--window must be at least 2 tokens, got {args.window}")
        corpus = scan(source, text_field=args.text_field, id_field=args.id_field, chunk_size=args.chunk_size,
                      chunker=args.chunks)
        embedder = Embedder.from_pretrained(args.model, pooling=args.pooling, attention_backend=args.attention_backend,
                                            device=device, torch_dtype=args.dtype)
        stats = encode_corpus(
            embedder, corpus, output, instruction=args.instruction, documents=args.documents,
            batch_size=args.batch_size, dim=args.dim, layers=args.layers, max_tokens=args.max_tokens,
            rank=rank, world_size=world, barrier=barrier, progress=not args.quiet,
            precision=args.precision, ranges=ranges, window=args.window,
        )
    finally:
        if args.input == "-":
            source.unlink(missing_ok=True)
    if rank == 0:
        print(stats.format(output))
        if args.precision == "float32":
            import numpy as np

            from llm2emb.model.spread import degenerate_warning

            warning = degenerate_warning(np.load(output, mmap_mode="r"), str(output))
            if warning:
                print(warning, file=sys.stderr)


# ---------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an llm2emb model folder")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_info)


def run_info(args) -> None:
    from llm2emb.commands.info import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")


# ---------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on STS files (Spearman) and BEIR folders (nDCG@10, Recall@100, MRR@10)")
    p.add_argument("model", help="llm2emb folder, base model with --pooling, or sentence-transformers folder")
    p.add_argument("--sts", action="append", default=[], metavar="FILE",
                   help="TSV with header score/sentence1/sentence2 (repeatable)")
    p.add_argument("--beir", action="append", default=[], metavar="DIR",
                   help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv (repeatable)")
    p.add_argument("--split", default="test", help="qrels split of the BEIR folders (default: test)")
    p.add_argument("--query-instruction", help="instruction for retrieval queries (default: the model's own)")
    p.add_argument("--sts-instruction", help="instruction for both STS sentences (default: none)")
    p.add_argument("--pooling", type=_pooling_arg, help="pooling when MODEL is a base model")
    p.add_argument("--attention", choices=["bidirectional", "causal"], help="attention when MODEL is a base model")
    p.add_argument("--dtype", choices=LOAD_DTYPES, help=LOAD_DTYPE_HELP)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    p.add_argument("--cache-dir", help="corpus embedding cache (default: $LLM2EMB_CACHE/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="always re-encode the corpus")
    p.add_argument("--corpus-sample", type=int, metavar="N",
                   help="quick run: keep N corpus documents (every relevant one plus random others, seed 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modules of an exported sentence-transformers folder")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="rank compressed vectors (int8/uint8 calibrated on each corpus; binary by Hamming)")
    p.add_argument("--rescore", type=int, metavar="R",
                   help="binary precisions: take R x more candidates by Hamming, re-rank them with the float query")
    p.add_argument("--long", nargs="+", default=[], choices=["passkey", "needle"], metavar="TASK",
                   help="LongEmbed's synthetic long-document tasks (passkey, needle), generated at --lengths tokens")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192], metavar="N",
                   help="--long: document lengths in tokens")
    p.add_argument("--long-documents", type=int, default=50, metavar="N", help="--long: documents per length")
    p.add_argument("--haystack", metavar="FILE", help="--long needle: prose to hide the needles in (JSONL or text)")
    p.add_argument("--rope-scaling", metavar="METHOD:FACTOR",
                   help="load the model with RoPE stretched beyond its window: pi | ntk | yarn, e.g. yarn:4")
    p.add_argument("--limit", choices=["small", "large"],
                   help="the LIMIT task (46 people, every pair a query; large: 50,000 documents), recall@2/10/100")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    add_device_argument(p)
    p.set_defaults(run=run_eval)


def run_eval(args) -> None:
    from llm2emb.evaluate import format_table, write_json
    from llm2emb.evaluate.runner import run_eval as evaluate

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    report = evaluate(
        args.model, pooling=args.pooling, attention=args.attention, max_length=args.max_length,
        trust_remote_code=args.trust_remote_code, sts=args.sts, beir=args.beir, split=args.split,
        query_instruction=args.query_instruction, sts_instruction=args.sts_instruction,
        batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
        corpus_sample=args.corpus_sample, precision=args.precision, rescore=args.rescore,
        rope_scaling=args.rope_scaling, long_tasks=args.long, long_lengths=args.lengths,
        long_documents=args.long_documents, haystack=args.haystack, limit=args.limit, torch_dtype=args.dtype,
        device=pick_device(args.device),
    )
    print(f"evaluated on {report.settings['device']}", file=sys.stderr)
    for result in report.results:
        if result.warning:
            print(result.warning, file=sys.stderr)
    print(format_table(report.results))
    if args.json:
        write_json(args.json, report.results, model=report.model, settings=report.settings,
                   environment=report.environment, load_seconds=report.load_seconds)
        print(f"wrote {args.json}")


# ---------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an embedder from a YAML recipe (LoRA, contrastive, multi-stage)")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key, e.g. --set stages[0].max_steps=10 (value read as YAML), or --set "
                        "@FILE: a YAML mapping of such key paths to values (recipes/overrides/); repeatable, in order")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--check", action="store_true", help="validate the recipe and load its data, then stop")
    p.set_defaults(run=run_train)


def run_train(args) -> None:
    from llm2emb.train.runner import check_recipe, train

    if args.check:
        print(check_recipe(args.recipe, args.overrides))
        return
    from llm2emb.train.distributed import end_process_group, is_main_process

    summary = train(args.recipe, args.overrides, resume=args.resume)
    end_process_group()
    if is_main_process():  # one summary line, not one per process
        print(summary.format())


# ---------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a sentence-transformers folder or an ONNX graph, or merge its "
                                      "LoRA adapter")
    p.add_argument("model", help="llm2emb model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["sentence-transformers", "onnx"],
                   help="sentence-transformers: Transformer + Pooling + Normalize (adapter merged); onnx: backbone, "
                        "pooler and normalisation in one graph for ONNX Runtime (adapter merged, checked to 1e-4)")
    p.add_argument("--int8", action="store_true", help="with --format onnx: also model_int8.onnx (dynamic int8)")
    p.add_argument("--merged", action="store_true", help="a standalone llm2emb folder with the LoRA adapter merged")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_device_argument(p)
    p.set_defaults(run=run_export)


def run_export(args) -> None:
    from llm2emb.commands.export import export

    if (args.format is None) == (not args.merged):
        raise UserError("choose one of --format sentence-transformers, --format onnx or --merged")
    if args.int8 and args.format != "onnx":
        raise UserError("--int8 is for --format onnx")
    if args.format == "onnx":
        from llm2emb.commands.export_onnx import export_onnx

        out = export_onnx(args.model, args.out, overwrite=args.overwrite, int8=args.int8)
        print(f"wrote {out} (ONNX{', with int8' if args.int8 else ''})")
        return
    out = export(args.model, args.out, format=args.format or "llm2emb", overwrite=args.overwrite,
                 device=pick_device(args.device))
    print(f"wrote {out} ({args.format or 'merged llm2emb folder'})")


# ---------------------------------------------------------------- mine
def _margin_arg(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def add_mine(sub) -> None:
    p = sub.add_parser("mine", help="mine hard negatives with a model (ANCE-style, false negatives filtered)")
    p.add_argument("model", help="llm2emb folder (or a base model) to embed with")
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text): where negatives come from")
    p.add_argument("--queries", help="BEIR queries.jsonl (_id, text); goes with --qrels")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--qrels", help="qrels TSV (query-id, corpus-id, score): score > 0 marks a positive")
    source.add_argument("--pairs", help="training rows with query and positive (JSONL/CSV/TSV/parquet)")
    p.add_argument("--out", required=True, help="JSONL to write: query, positive, negatives, instruction")
    p.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (default 100)")
    p.add_argument("--rank-window", default=None, metavar="START:END",
                   help="keep candidates ranked START..END-1 after removing positives (default 0:TOP_K)")
    p.add_argument("--margin", type=_margin_arg, default=0.95,
                   help="drop candidates scoring >= MARGIN x the positive's score (default 0.95; none: keep)")
    p.add_argument("--num-negatives", type=int, default=7, help="negatives written per row (default 7)")
    p.add_argument("--instruction", help="instruction for every query (written into the rows)")
    p.add_argument("--batch-size", type=int, default=32)
    add_device_argument(p)
    p.set_defaults(run=run_mine)


def run_mine(args) -> None:
    from llm2emb.commands.mine import mine, parse_window
    from llm2emb.train.data import read_pairs

    device = pick_device(args.device)  # before any data is read: a missing GPU fails at once
    stats = mine(
        args.model, corpus=args.corpus, out=args.out, queries=args.queries, qrels=args.qrels,
        pairs=read_pairs(args.pairs) if args.pairs else None,
        top_k=args.top_k, rank_window=parse_window(args.rank_window) if args.rank_window else None,
        margin=args.margin, num_negatives=args.num_negatives, instruction=args.instruction,
        batch_size=args.batch_size, device=device,
    )
    print(stats.format(args.out))


# ---------------------------------------------------------------- merge
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="average LoRA adapters and poolers of models trained from one base (souping)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="llm2emb adapter folders of the same base")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--weights", help="comma-separated weights, normalised to sum to 1 (default: equal)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_device_argument(p)
    p.set_defaults(run=run_merge)


def run_merge(args) -> None:
    from llm2emb.commands.merge import merge, parse_weights

    out = merge(args.models, args.out, parse_weights(args.weights, len(args.models)), overwrite=args.overwrite,
                device=pick_device(args.device))
    print(f"merged {len(args.models)} models into {out}")


# ---------------------------------------------------------------- main
# ---------------------------------------------------------------- synth
def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate training rows for a corpus with an instruct decoder, filtered")
    p.add_argument("--corpus", required=True, help="JSONL (text in --text-field, after title) or text, one per line")
    p.add_argument("--generator", required=True, help="causal LM: hub id, HF folder, .gguf or asset alias")
    p.add_argument("--out", required=True, help="JSONL rows (query, positive[, negative], instruction) for a recipe")
    p.add_argument("--tasks", nargs="+", default=["question"], metavar="TASK",
                   help="query types per document: question claim paraphrase keywords")
    p.add_argument("--negatives", action="store_true", help="also generate a hard negative per query")
    p.add_argument("--embedder", help="consistency filter: keep a row only if this model ranks its document in top-k")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", help="JSONL: the field each row's `source` names")
    p.add_argument("--limit", type=int, help="only the first N documents")
    p.add_argument("--chunk-size", type=int, default=64, help="documents generated and saved at a time (resume unit)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated at once")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_argument(p)
    p.set_defaults(run=run_synth)


def run_synth(args) -> None:
    from llm2emb.commands.synth import synth_from_files

    for name in ("top_k", "chunk_size", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be above 0, got {args.temperature}")
    stats = synth_from_files(
        args.corpus, args.generator, args.out, text_field=args.text_field, id_field=args.id_field,
        chunk_size=args.chunk_size, embedder_reference=args.embedder, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, tasks=args.tasks, negatives=args.negatives, top_k=args.top_k,
        batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, limit=args.limit,
        device=pick_device(args.device),
    )
    print(stats.format(Path(args.out)))


COMMANDS = [add_convert, add_encode, add_info, add_eval, add_train, add_export, add_mine, add_merge, add_synth]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2emb", description=__doc__.splitlines()[0],
        epilog="Typical use: llm2emb convert --base smollm2-135m --out model; llm2emb train recipe.yaml; "
               "llm2emb eval runs/x/model --sts stsb.tsv. `llm2emb COMMAND --help` lists a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        args.run(args)
    except UserError as exc:  # one line, whatever a library's message held (YAML errors span lines)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"llm2emb {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the system refused a file operation (permission, full disk, a name too long)
        where = f": {str(exc.filename)[:200]}" if exc.filename else ""
        print(f"llm2emb {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"llm2emb {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
