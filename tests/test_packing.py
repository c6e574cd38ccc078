"""Packed (unpadded) batches: same embeddings as alone, no attention across texts, same gradients, budgets, backends."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from llm2emb import Embedder, UserError
from llm2emb.cli import main
from llm2emb.model.attention import resolve_backend
from llm2emb.model.backbone import VERIFIED_MODEL_TYPES
from llm2emb.model.packing import block_diagonal_mask, pack, segment_ids, token_budget_batches, unpack
from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.losses import InfoNCELoss
from tests.conftest import EVERY_POOLING

TEXTS = [
    "A man is playing a guitar on the street.",
    "The cat sat.",
    "Proteins fold into three-dimensional structures; enzymes catalyse reactions in the cell.",
    "Given a question, retrieve passages that answer it.",
]
CPU = torch.device("cpu")


def pooling_id(pooling):
    return pooling if isinstance(pooling, str) else pooling["type"]


def load(path, pooling="mean", backend="auto"):
    """The same Embedder on every call (trainable poolers are seeded), so two backends can be compared."""
    torch.manual_seed(1)
    embedder = Embedder.from_pretrained(path, pooling=pooling, torch_dtype=torch.float32, attention_backend=backend)
    with torch.no_grad():  # trainable poolers start equal to mean pooling; give them weights of their own
        for parameter in embedder.pooler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return embedder


# ---------------------------------------------------------------- packing itself
@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_unpack_round_trip_and_positions(side):
    lengths = [3, 1, 4]
    width = 5
    mask = torch.zeros(3, width, dtype=torch.long)
    ids = torch.full((3, width), -1)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        mask[row, span] = 1
        ids[row, span] = torch.arange(n) + 10 * row
    packed = pack(ids, mask)
    assert packed.input_ids.tolist() == [[0, 1, 2, 10, 20, 21, 22, 23]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 8] and packed.max_length == 4
    hidden = packed.input_ids.unsqueeze(-1).float()
    restored = unpack(hidden, packed)[..., 0]
    assert torch.equal(restored, torch.where(mask.bool(), ids, 0).float())


def test_segment_ids_and_block_diagonal_mask():
    cu_seqlens = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    text, position = segment_ids(cu_seqlens)
    assert text.tolist() == [0, 0, 1, 2, 2, 2]
    assert position.tolist() == [0, 1, 0, 0, 1, 2]
    mask = block_diagonal_mask(cu_seqlens)
    assert mask.shape == (1, 1, 6, 6)
    for i in range(6):
        for j in range(6):
            assert bool(mask[0, 0, i, j]) == (text[i] == text[j])


@pytest.mark.parametrize("causal_sink", [False, True])
@torch.no_grad()
def test_varlen_attention_equals_block_diagonal_mask(tiny_qwen2, causal_sink):
    """The packed kernel computes what one packed row under a block-diagonal mask computes (eager attention); with
    the causal sink, the mask lets each text's first token see itself alone."""
    embedder = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32, attention_backend="packed",
                                        causal_sink=causal_sink)
    batch = embedder.tokenize(TEXTS)
    packed = pack(batch["input_ids"], batch["attention_mask"])
    varlen = embedder.backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                               llm2emb_kernel="sdpa", **packed.attention_kwargs()).last_hidden_state
    reference = Embedder.from_pretrained(tiny_qwen2, torch_dtype=torch.float32, attn_implementation="eager",
                                         causal_sink=False).backbone
    allowed = block_diagonal_mask(packed.cu_seqlens)
    if causal_sink:
        starts = packed.cu_seqlens[:-1].long()
        allowed[..., starts, :] = False
        allowed[..., starts, starts] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # eager adds masks
    blocked = reference(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        attention_mask=additive).last_hidden_state
    assert (varlen - blocked).abs().max().item() <= 1e-5
    leaky = reference(input_ids=packed.input_ids, position_ids=packed.position_ids).last_hidden_state
    # position_ids alone leak across texts (docs/ARCHITECTURE.md, "Verified facts")
    assert (varlen - leaky).abs().max().item() > 1e-3


# ---------------------------------------------------------------- the packed Embedder
@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
@pytest.mark.parametrize("pooling", EVERY_POOLING, ids=pooling_id)
@torch.no_grad()
def test_packed_embedding_equals_embedding_alone(tiny_models, arch, pooling):
    embedder = load(tiny_models[arch], pooling, backend="packed")
    assert embedder.attention_kernel == "sdpa"
    for side in ("right", "left"):
        embedder.config.padding_side = side
        embedder.set_attention_backend("packed")
        together = embedder(embedder.tokenize(TEXTS, "Find a paraphrase"))
        embedder.set_attention_backend("padded")
        for i, text in enumerate(TEXTS):
            alone = embedder(embedder.tokenize([text], "Find a paraphrase"))
            assert (alone[0] - together[i]).abs().max().item() <= 1e-5, (side, i)


@torch.no_grad()
def test_no_attention_across_packed_texts(tiny_qwen2):
    embedder = load(tiny_qwen2, "last_token", backend="packed")
    batch = embedder.tokenize(TEXTS)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, 0] = (changed["input_ids"][1, 0] + 7) % embedder.backbone.config.vocab_size
    before, after = embedder(batch), embedder(changed)
    assert (before[1] - after[1]).abs().max().item() > 1e-4
    others = [0, 2, 3]
    assert (before[others] - after[others]).abs().max().item() <= 1e-6


def test_packed_gradients_equal_padded(tiny_models):
    """A LoRA backbone through PEFT: packed kwargs reach the attention and the gradients match the padded ones."""
    grads = {}
    for backend in ("padded", "packed"):
        embedder = load(tiny_models["llama"], {"type": "latent_attention", "num_latents": 8, "num_heads": 4}, backend)
        torch.manual_seed(0)
        embedder.backbone = get_peft_model(embedder.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for name, parameter in embedder.backbone.named_parameters():
            if "lora_B" in name:  # LoRA B starts at zero; give it weights so lora_A gets a gradient too
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        embedder.train()
        out = embedder(embedder.tokenize(TEXTS))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    assert grads["padded"].keys() == grads["packed"].keys() and len(grads["packed"]) > 8
    for name, grad in grads["padded"].items():
        assert torch.allclose(grad, grads["packed"][name], atol=1e-6, rtol=1e-4), name


def test_gradcache_step_packed_equals_padded(tiny_qwen2):
    """GradCache chunks go through the packed forward when the backend is packed; the step's gradients agree."""
    queries, documents = TEXTS, [t[::-1] for t in TEXTS]
    loss_module, ids = InfoNCELoss(), torch.arange(len(TEXTS))

    def loss_fn(embeddings):
        return loss_module(embeddings[0], embeddings[1], ids, ids + 100)

    results = {}
    for backend in ("padded", "packed"):
        embedder = load(tiny_qwen2, "mean", backend)
        embedder.train()
        batches = [embedder.tokenize(queries), embedder.tokenize(documents, kind="document")]
        loss = gradcache_backward(embedder, batches, loss_fn, chunk_size=3)
        results[backend] = loss, {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    assert torch.allclose(results["padded"][0], results["packed"][0], atol=1e-6)
    for name, grad in results["padded"][1].items():
        assert torch.allclose(grad, results["packed"][1][name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("backend", ["padded", "packed"])
def test_encode_with_token_budget_equals_plain_encode(tiny_qwen2, backend):
    embedder = load(tiny_qwen2, "last_token", backend)
    texts = TEXTS * 3
    reference = load(tiny_qwen2, "last_token", "padded").encode(texts, batch_size=1)
    budgeted = embedder.encode(texts, batch_size=5, max_tokens=40)
    assert abs(budgeted - reference).max() <= 1e-5
    with pytest.raises(UserError, match="max_tokens"):
        embedder.encode(texts, max_tokens=0)


# ---------------------------------------------------------------- token budgets
@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_properties(packed):
    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted((rng.randint(1, 60) for _ in range(rng.randint(0, 40))), reverse=True)
        budget = rng.randint(1, 150)
        max_rows = rng.choice([None, 1, 3, 8])
        groups = list(token_budget_batches(lengths, budget, max_rows, packed))
        assert [i for g in groups for i in g] == list(range(len(lengths)))  # every text once, order kept
        for group in groups:
            sizes = [lengths[i] for i in group]
            cost = sum(sizes) if packed else max(sizes) * len(sizes)
            assert group and (cost <= budget or len(group) == 1)
            assert max_rows is None or len(group) <= max_rows
            if len(group) == 1 and lengths[group[0]] > budget:
                assert sizes == [lengths[group[0]]]  # an oversize text travels alone
    assert list(token_budget_batches([9, 2, 1], 5, None, packed)) == [[0], [1, 2]]
    assert list(token_budget_batches([3, 3, 3], None, 2, packed)) == [[0, 1], [2]]


# ---------------------------------------------------------------- backends
def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", CPU, torch.float32, "sdpa") == "sdpa"  # measured: same speed, less memory
    assert resolve_backend("auto", torch.device("cuda"), torch.float32, "sdpa") == "padded"  # no varlen kernel
    assert resolve_backend("packed", CPU, torch.float32, "sdpa") == "sdpa"
    assert resolve_backend("padded", CPU, torch.float32, "eager") == "padded"
    assert resolve_backend("auto", CPU, torch.float32, "eager") == "padded"


@pytest.mark.parametrize(
    "backend, implementation, message",
    [
        ("flash_attn", "sdpa", "flash"),
        ("varlen_attn", "sdpa", "CUDA only"),
        ("packed", "eager", "attn_implementation='eager'"),
        ("fastest", "sdpa", "attention_backend must be one of"),
    ],
)
def test_backend_errors_are_one_line(backend, implementation, message):
    with pytest.raises(UserError, match=message) as error:
        resolve_backend(backend, CPU, torch.bfloat16, implementation)
    assert "\n" not in str(error.value)


def test_from_pretrained_refuses_an_unusable_backend(tiny_qwen2):
    with pytest.raises(UserError) as error:
        Embedder.from_pretrained(tiny_qwen2, attention_backend="flash_attn")
    assert "flash" in str(error.value) and "\n" not in str(error.value)


def test_packed_backbone_saves_a_plain_config(tiny_qwen2, tmp_path):
    embedder = load(tiny_qwen2, backend="packed")
    embedder(embedder.tokenize(TEXTS[:2]))
    embedder.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "llm2emb" not in json.dumps(config)
    assert Embedder.from_pretrained(tmp_path / "out").attention_backend == "auto"


# ---------------------------------------------------------------- Matryoshka layers
def truncated_copy(source, destination, layers: int):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config["num_hidden_layers"] = layers
    config.pop("layer_types", None)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("arch", VERIFIED_MODEL_TYPES)
@pytest.mark.parametrize("backend", ["padded", "packed"])
@torch.no_grad()
def test_first_layers_equal_a_model_cut_to_those_layers(tiny_models, tmp_path, arch, backend):
    full = load(tiny_models[arch], "last_token", backend)
    cut = load(truncated_copy(tiny_models[arch], tmp_path / "cut", 1), "last_token", "padded")
    assert cut.num_layers == 1 and full.num_layers == 2
    batch = full.tokenize(TEXTS)
    assert (full(batch, layers=1) - cut(batch)).abs().max().item() <= 1e-5
    assert abs(full.encode(TEXTS, layers=1) - cut.encode(TEXTS)).max() <= 1e-5
    assert full.num_layers == 2  # the layer list is restored
    assert (full(batch, layers=2) - full(batch)).abs().max().item() == 0.0
    assert (full(batch, layers=1) - full(batch)).abs().max().item() > 1e-3


def test_layers_errors(tiny_qwen2):
    embedder = load(tiny_qwen2)
    for bad in (0, 3):
        with pytest.raises(UserError, match="layers must be between 1 and 2"):
            embedder.encode(TEXTS, layers=bad)
    multi = load(tiny_qwen2, {"type": "multi_layer", "num_latents": 4, "num_heads": 4})
    with pytest.raises(UserError, match="reads every layer"):
        multi.encode(TEXTS, layers=1)


def test_cli_encode_layers_budget_and_backend(tiny_qwen2, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "e.npy"
    args = ["encode", str(tiny_qwen2), "--pooling", "mean", "--input", str(texts), "--output", str(out), "--layers", "1",
            "--max-tokens", "30", "--attention-backend", "packed"]
    assert main(args) == 0
    expected = Embedder.from_pretrained(tiny_qwen2, pooling="mean").encode(TEXTS, layers=1)
    assert np.abs(np.load(out) - expected).max() <= 1e-5
    assert main(args[:-2] + ["--attention-backend", "flash_attn"]) == 2

