"""`llm2emb export --format onnx`: the backbone, the pooler and the normalisation in one ONNX graph, for ONNX Runtime
(and OpenVINO, which reads ONNX) on machines without torch.

The graph is exported with torch's own exporter (`torch.onnx.export(dynamo=True)`, no optimum: optimum-onnx pins
transformers < 4.58), with dynamic batch and sequence axes. Its inputs are the three int64 (batch, tokens) matrices an
Embedder pools from: `input_ids`, `attention_mask` and `pool_mask` (1 on the tokens the vector pools: the text, not
the instruction; for documents and plain texts it equals attention_mask); its output `sentence_embedding` is (batch,
dim), L2-normalised when the model normalises. The causal sink and every pooler are traced as they run in torch; the
attention is the padded path (packing is a torch-side speed-up). `OnnxEncoder` runs the export the way an Embedder
encodes: llm2emb's prompt templates and truncation rule, then the session. An int8 copy (`--int8`) comes from
onnxruntime's dynamic quantization (weights int8 per output channel, activations quantized per batch), with the MLP's
down projections left in fp32: quantized, they took the vectors far from fp32 (most likely because their input
carries the massive activations of a decoder's sink token, and one activation scale per tensor then flattens every
other token; benchmarks/RESULTS.md, "The int8 copy").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llm2emb.commands.export import merged
from llm2emb.errors import UserError
from llm2emb.files import atomic_folder, refuse_non_empty
from llm2emb.model.card import write_card
from llm2emb.model.embedder import Embedder
from llm2emb.model.prompts import Prompts
from llm2emb.model.tokenization import PromptTokenizer, pad_rows

GRAPH_NAME = "model.onnx"
INT8_NAME = "model_int8.onnx"
SETTINGS_NAME = "llm2emb_onnx.json"
INPUTS = ("input_ids", "attention_mask", "pool_mask")
OUTPUT = "sentence_embedding"
OPSET = 18
INT8_MIN_COSINE = 0.98
"""An int8 copy whose vectors fall below this cosine to the fp32 graph's on the check texts is refused."""


class PooledGraph(torch.nn.Module):
    """What the graph computes: the backbone's states, pooled, normalised (Embedder.forward without its checks on
    the batch, which cannot be traced; the encoder makes the same checks before it runs the session)."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.backbone, self.pooler, self.normalize = embedder.backbone, embedder.pooler, embedder.config.normalize

    def forward(self, input_ids, attention_mask, pool_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=self.pooler.needs_all_layers)
        layers = out.hidden_states[1:] if self.pooler.needs_all_layers else None
        pooled = self.pooler(out.last_hidden_state, pool_mask, layers)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def export_onnx(model: str | Path, out: str | Path, overwrite: bool = False, int8: bool = False) -> Path:
    """Write `out`/model.onnx (and model_int8.onnx), the tokenizer, llm2emb_onnx.json and a model card; the export
    is checked against the Embedder on a few texts before the folder is renamed into place."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("export --format onnx needs onnx, onnxscript and onnxruntime: pip install 'llm2emb[onnx]'") from None
    out = Path(out)
    refuse_non_empty(out, overwrite)
    embedder = merged(Embedder.from_pretrained(model, torch_dtype=torch.float32, device="cpu")).eval()
    if embedder.config.rope_scaling is not None:
        raise UserError(f"{model}: RoPE scaling is not exported to ONNX yet; export --merged instead")
    embedder.set_attention_backend("padded")
    texts = ["A man is playing a guitar on the street.", "Proteins fold.",
             "Enzymes catalyse the reactions of the cell, and the cell divides when they are done."]
    sample = embedder.tokenize(texts)
    with atomic_folder(out) as staging:
        graph = staging / GRAPH_NAME
        batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
        axes = {name: {0: batch, 1: tokens} for name in INPUTS}
        try:
            with torch.no_grad():
                torch.onnx.export(PooledGraph(embedder), tuple(sample[name] for name in INPUTS), str(graph),
                                  input_names=list(INPUTS), output_names=[OUTPUT], dynamic_shapes=axes,
                                  opset_version=OPSET, dynamo=True)
        except Exception as exc:  # the exporter's own failure: one line naming what would not trace
            raise UserError(f"{model}: torch's ONNX exporter could not export this model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        embedder.tokenizer.save_pretrained(str(staging))
        settings = {"inputs": list(INPUTS), "output": OUTPUT, "dim": embedder.dim, "graphs": [GRAPH_NAME],
                    "model": {key: getattr(embedder.config, key) for key in (
                        "attention", "causal_sink", "pooling", "normalize", "max_length", "padding_side",
                        "query_template", "document_template", "text_template", "default_query_instruction",
                        "default_document_instruction", "matryoshka_dims")},
                    "append_eos": embedder.pooler.needs_eos}
        if int8:
            quantize_int8(graph, staging / INT8_NAME, embedder.backbone.config.intermediate_size)
            settings["graphs"].append(INT8_NAME)
        (staging / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        check_export(staging, embedder, texts)
        if int8:
            settings["int8_min_cosine"] = check_int8(staging, texts)
            (staging / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        write_card(staging, embedder.folder_config(), source=str(model))
    return out


def check_export(folder: Path, embedder: Embedder, texts: Sequence[str]) -> None:
    """Refuse an export whose fp32 graph does not give the Embedder's vectors (1e-4), on shapes other than the
    traced one too (one text, no padding)."""
    encoder = OnnxEncoder(folder)
    for group in (texts, texts[:1], texts[1:]):
        difference = float(np.abs(encoder.encode(group) - embedder.encode(group)).max())
        if difference > 1e-4:
            raise UserError(f"the ONNX graph does not give the model's vectors (max |diff| {difference:.2e} on "
                            f"{len(group)} texts); report it with the model's llm2emb.json")


def down_projections(graph: Path, intermediate_size: int) -> list[str]:
    """The MLP's down-projection MatMuls of an exported graph: those whose constant weight is intermediate_size x
    hidden (the exporter names nodes by op, not by module)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    return [node.name for node in proto.graph.node
            if node.op_type == "MatMul" and shapes.get(node.input[1], [None])[0] == intermediate_size]


def quantize_int8(graph: Path, target: Path, intermediate_size: int) -> None:
    """onnxruntime's dynamic int8 quantization, per output channel, of every weight MatMul but the down projections."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(graph), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=down_projections(graph, intermediate_size))


def row_cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The cosine between each row of `first` and the same row of `second`: how far a copy's vectors moved."""
    return (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)


def check_int8(folder: Path, texts: Sequence[str]) -> float:
    """The lowest cosine between the int8 and the fp32 graph's vectors on the check texts; refused below
    INT8_MIN_COSINE."""
    exact, quantized = OnnxEncoder(folder).encode(texts), OnnxEncoder(folder, graph=INT8_NAME).encode(texts)
    lowest = round(float(row_cosines(exact, quantized).min()), 4)
    if lowest < INT8_MIN_COSINE:
        raise UserError(f"the int8 ONNX graph's vectors differ from fp32 (lowest cosine {lowest} < "
                        f"{INT8_MIN_COSINE}): export without --int8")
    return lowest


RUNTIMES = ("onnxruntime", "openvino")


def onnxruntime_runner(graph: Path, threads: int | None):
    """feeds -> sentence_embedding with an ONNX Runtime CPU session."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run([OUTPUT], feeds)[0]


def openvino_runner(graph: Path, threads: int | None):
    """feeds -> sentence_embedding with the graph compiled by OpenVINO for the CPU."""
    try:
        import openvino
    except ImportError:
        raise UserError("runtime openvino: install it (pip install 'llm2emb[openvino]')") from None
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = openvino.Core().compile_model(str(graph), "CPU", config)
    output = compiled.output(OUTPUT)
    return lambda feeds: compiled(feeds)[output]


class OnnxEncoder:
    """An exported folder run with ONNX Runtime or OpenVINO, tokenized as its Embedder tokenizes (templates, default
    instructions, the text cut and never the prompt): `encode`, `encode_queries`, `encode_documents`.

    `runtime="openvino"` compiles the same ONNX file with OpenVINO for the CPU (`Core.compile_model`, as its users
    load an ONNX model), at fp32 inference precision: OpenVINO would otherwise run bfloat16 on CPUs that have it."""

    def __init__(self, folder: str | Path, graph: str = GRAPH_NAME, threads: int | None = None,
                 max_length: int | None = None, runtime: str = "onnxruntime"):
        from transformers import AutoTokenizer

        folder = Path(folder)
        settings_path = folder / SETTINGS_NAME
        if not settings_path.is_file():
            raise UserError(f"{folder}: no {SETTINGS_NAME}; not an llm2emb ONNX export")
        self.settings = json.loads(settings_path.read_text())
        if graph not in self.settings["graphs"]:
            raise UserError(f"{folder}: has no {graph} (it holds {', '.join(self.settings['graphs'])})")
        if runtime not in RUNTIMES:
            raise UserError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.run = (onnxruntime_runner if runtime == "onnxruntime" else openvino_runner)(folder / graph, threads)
        model = self.settings["model"]
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.padding_side = model["padding_side"]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.prompt_tokenizer = PromptTokenizer(tokenizer, Prompts(model["query_template"], model["document_template"],
                                                                     model.get("text_template", "{text}")),
                                                self.settings["append_eos"], max_length or model["max_length"])

    def encode(self, texts: Sequence[str], instruction: str | None = None, kind: str = "query",
               batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 vectors in the order of `texts`, as `Embedder.encode` gives them."""
        rows = [(row.ids, row.pool) for row in self.prompt_tokenizer.rows(texts, instruction, None, kind)]
        pad = self.prompt_tokenizer.tokenizer.pad_token_id
        left = self.model["padding_side"] == "left"
        out = np.zeros((len(rows), self.settings["dim"]), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            group = rows[start:start + batch_size]
            out[start:start + len(group)] = self.run(pad_rows(group, pad, left))
        return out

    def encode_queries(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        return self.encode(texts, instruction or self.model["default_query_instruction"], kind="query", **kwargs)

    def encode_documents(self, texts: Sequence[str], instruction: str | None = None, **kwargs) -> np.ndarray:
        return self.encode(texts, instruction or self.model["default_document_instruction"], kind="document", **kwargs)
