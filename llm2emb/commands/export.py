"""`llm2emb export`: a model folder as a standalone merged llm2emb folder, or as a sentence-transformers folder.

Sentence-transformers trusts only its own module types without `trust_remote_code`, and external tools (TEI, vLLM)
read only those, so mean and last-token pooling export as Transformer + Pooling + Normalize: the Transformer's
config.json says `is_causal: false`, which transformers >=5.2 honours on load, so the folder is bidirectional with
no custom code. Last-token pooling reads an EOS that llm2emb appends itself; the exported tokenizer appends it
instead (a post-processor), so every tool sees the same tokens. The default query instruction becomes the named
prompt `query` (the template's prefix), which `encode_query` and mteb pick up; `include_prompt: false` keeps it
out of the pooled vector. One difference remains for mean pooling: sentence-transformers measures the prompt by
tokenizing it alone, which counts the template's trailing space as a token, so with the query prompt the first word
of the text is left out of the mean too (llm2emb pools it; documents and last-token vectors are identical). Poolers with no sentence-transformers equivalent ship as one self-contained module file
(llm2emb/integrations/st_pooling.py) that loads with `trust_remote_code=True`.

A LoRA adapter is merged into the exported weights in both formats.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from llm2emb.errors import UserError
from llm2emb.files import atomic_folder, refuse_non_empty
from llm2emb.model.backbone import is_peft
from llm2emb.model.card import write_card
from llm2emb.model.embedder import Embedder
from llm2emb.model.serving import PORTABLE_POOLING, write_engine_layout

FORMATS = ("sentence-transformers", "llm2emb")
CUSTOM_MODULE = Path(__file__).parents[1] / "integrations" / "st_pooling.py"


def merged(embedder: Embedder) -> Embedder:
    """The same Embedder with its LoRA adapter folded into the backbone weights (no-op without one)."""
    if is_peft(embedder.backbone):
        embedder.backbone = embedder.backbone.merge_and_unload()
        embedder.config.backbone = "weights"
    return embedder


def export_merged(model: str | Path, out: str | Path, overwrite: bool = False, device: str | None = None) -> Path:
    """A standalone llm2emb folder with the adapter merged: loads without the base model or peft."""
    embedder = Embedder.from_pretrained(model, torch_dtype="auto", device=device)
    folder = merged(embedder).save_pretrained(out, overwrite=overwrite)
    write_card(folder, embedder.folder_config(), source=str(model))
    return folder


def _query_prompt(embedder: Embedder) -> str | None:
    """The default query instruction rendered as a prefix, or None when queries get no instruction."""
    instruction = embedder.config.default_query_instruction
    if not instruction:
        return None
    template = embedder.config.query_template
    before, after = template.split("{text}", 1)
    if after:
        raise UserError(f"query template {template!r} puts text after {{text}}; sentence-transformers prompts are "
                        "prefixes only")
    return before.replace("{instruction}", instruction)


def _special_prefix(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (a BOS), which llm2emb leaves out of pooling."""
    encoded = tokenizer("x", add_special_tokens=True, return_special_tokens_mask=True)
    count = 0
    for flag in encoded["special_tokens_mask"]:
        if not flag:
            break
        count += 1
    return count


def _append_eos(tokenizer):
    """A copy of `tokenizer` whose post-processor appends EOS to every text, as llm2emb does for last-token pooling."""
    from tokenizers import processors

    tokenizer = copy.deepcopy(tokenizer)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                           special_tokens=[(eos, eos_id)])
    backend = tokenizer.backend_tokenizer
    existing = backend.post_processor
    backend.post_processor = append if existing is None else processors.Sequence([existing, append])
    return tokenizer


def export_sentence_transformers(model: str | Path, out: str | Path, overwrite: bool = False,
                                 device: str | None = None) -> Path:
    """Write a sentence-transformers folder whose embeddings equal the Embedder's (see the module docstring)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out = Path(out)
    refuse_non_empty(out, overwrite)
    embedder = merged(Embedder.from_pretrained(model, torch_dtype="auto", device=device))
    config, pooling = embedder.config, embedder.config.pooling["type"]
    if config.causal_sink:
        raise UserError(f"{model}: keeps each text's first token causal (causal_sink), which plain transformers, and "
                        "so sentence-transformers, vLLM and TEI, cannot do; export --format llm2emb, or train from "
                        "a base converted with --no-causal-sink")
    if config.text_template != "{text}":
        raise UserError(f"{model}: wraps every text in the text template {config.text_template!r}, whose tokens llm2emb "
                        "leaves out of the pooled vector and sentence-transformers would pool; export --format llm2emb "
                        "or onnx, or train from a base converted with --text-template none")
    portable = pooling in PORTABLE_POOLING
    if portable and pooling == "mean" and _special_prefix(embedder.tokenizer):
        raise UserError(f"{model}: the tokenizer adds a BOS token that llm2emb leaves out of mean pooling but "
                        "sentence-transformers' Pooling would include; no portable export for this model")

    with tempfile.TemporaryDirectory(prefix=".llm2emb-export-", dir=out.parent if out.parent.exists() else None) as tmp:
        hf = Path(tmp) / "hf"
        backbone = embedder.backbone
        backbone.config.output_hidden_states = pooling == "multi_layer"
        backbone.save_pretrained(str(hf))
        tokenizer = _append_eos(embedder.tokenizer) if embedder.pooler.needs_eos else copy.deepcopy(embedder.tokenizer)
        tokenizer.padding_side = "right"  # default position ids count from the row start; right padding keeps them
        tokenizer.chat_template = None  # sentence-transformers would wrap every text in an instruct model's template
        tokenizer.save_pretrained(str(hf))
        modules = [Transformer(str(hf), max_seq_length=config.max_length)]
        if portable:
            modules.append(Pooling(embedder.dim, PORTABLE_POOLING[pooling], include_prompt=False))
        else:
            modules.append(_custom_pooling(embedder))
        if config.normalize:
            modules.append(Normalize())
        prompts = {"query": _query_prompt(embedder) or "", "document": ""}
        if config.default_document_instruction:
            raise UserError(f"{model}: a default document instruction has no sentence-transformers equivalent")
        st = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine", device="cpu")
        with atomic_folder(out) as staging:
            st.save(str(staging))
            write_engine_layout(staging, config.max_length)
            if not portable:
                shutil.copy(CUSTOM_MODULE, staging / CUSTOM_MODULE.name)
    return out


def _custom_pooling(embedder: Embedder):
    """The exported folder's own pooling module, built from the same file it will load from."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(CUSTOM_MODULE.stem, CUSTOM_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pooler = embedder.pooler
    prompt = _query_prompt(embedder)
    prompt_ids = embedder.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else None
    custom = module.Llm2EmbPooling(embedder.config.pooling, pooler.hidden_size, pooler.num_layers,
                                   num_special_prefix=_special_prefix(embedder.tokenizer), prompt_ids=prompt_ids)
    if pooler.trainable:
        custom.load_state_dict(pooler.state_dict())
    return custom


def export(model: str | Path, out: str | Path, format: str, overwrite: bool = False, device: str | None = None) -> Path:
    """`model` as `format` (llm2emb: the adapter merged; sentence-transformers), loaded and merged on `device`."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if format == "llm2emb":
        return export_merged(model, out, overwrite=overwrite, device=device)
    return export_sentence_transformers(model, out, overwrite=overwrite, device=device)
