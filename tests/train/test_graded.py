"""CoSENT and AnglE on graded pairs: the losses by hand, their effect, GradCache, and a recipe stage end to end."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.train.gradcache import gradcache_backward
from llm2emb.train.graded import GradedPairLoss, angle_alignment, ranking_loss
from llm2emb.train.recipe_file import load_recipe


def test_ranking_loss_equals_the_hand_computation_and_ignores_ties():
    values, scores = torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, 2.0])
    # ordered pairs (i above j): (0, 1), (0, 2), (2, 1) -> exp(20 (v_j - v_i))
    want = math.log(1 + math.exp(20 * -0.8) + math.exp(20 * -0.4) + math.exp(20 * -0.4))
    assert ranking_loss(values, scores, 20.0).item() == pytest.approx(want, rel=1e-5)
    assert ranking_loss(values, torch.tensor([2.0, 2.0, 2.0]), 20.0).item() == 0.0
    reversed_order = ranking_loss(values, torch.tensor([1.0, 3.0, 2.0]), 20.0)
    assert reversed_order.item() > 5  # the same vectors, ranked against the gold order


def test_angle_alignment_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]])  # complex (1 + 0.5i, 2 - 1i)
    assert angle_alignment(z, z).item() == pytest.approx(1.0)
    w = torch.tensor([[0.5, 1.0, 1.0, 0.0]])  # (0.5 + 1i, 1 + 0i)
    zs, ws = [complex(1, 0.5), complex(2, -1)], [complex(0.5, 1), complex(1, 0)]
    w_norm2 = sum(abs(x) ** 2 for x in ws)  # the whole vector's squared norm, not each dimension's
    products = [x * y.conjugate() / w_norm2 for x, y in zip(zs, ws)]
    ratio = z.norm().item() / w.norm().item()
    want = abs(sum(q.real + q.imag for q in products) / ratio)
    assert angle_alignment(z, w).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="even width"):
        angle_alignment(torch.ones(1, 3), torch.ones(1, 3))


def reference_losses():
    """angle-emb's own loss module (angle_emb/loss.py), loaded by path: the package's __init__ imports its evaluation
    and training stack, whose pins (transformers 5.3, peft 0.18) cannot sit beside llm2emb's, so CI installs it
    with --no-deps and only this file, which needs torch alone, is used."""
    import importlib.util

    found = importlib.util.find_spec("angle_emb")
    if found is None:
        pytest.skip("angle-emb is not installed (pip install --no-deps angle-emb==0.6.1)")
    spec = importlib.util.spec_from_file_location("angle_emb_loss", Path(found.submodule_search_locations[0]) / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("width", [8, 576])
def test_cosent_and_angle_terms_equal_the_reference_implementation(width):
    """Values and gradients against angle-emb 0.6.1 on random pairs (its zigzag layout: row 2i and 2i+1 a pair)."""
    reference = reference_losses()
    torch.manual_seed(width)
    left, right = torch.randn(16, width, dtype=torch.float64), torch.randn(16, width, dtype=torch.float64)
    right[:4] = left[:4] + 0.1 * right[:4]  # some pairs close, so the ranking has both ends
    scores = torch.randint(0, 6, (16,)).double()
    zigzag = torch.stack([left, right], dim=1).reshape(32, width).requires_grad_()
    labels = scores.repeat_interleave(2)[:, None]
    mine = zigzag.detach().clone().requires_grad_()
    for ours_of, theirs_of in [
        (lambda q, d: ranking_loss(torch.nn.functional.cosine_similarity(q, d, dim=-1), scores, 20.0),
         lambda y: reference.cosine_loss(labels, y, tau=20.0)),
        (lambda q, d: ranking_loss(angle_alignment(q, d).double(), scores, 20.0),
         lambda y: reference.angle_loss(labels, y, tau=20.0)),
    ]:
        zigzag.grad = mine.grad = None
        theirs = theirs_of(zigzag)
        ours = ours_of(mine[0::2], mine[1::2])
        theirs.backward()
        ours.backward()
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        torch.testing.assert_close(mine.grad, zigzag.grad, rtol=1e-3, atol=1e-6 * zigzag.grad.abs().max().item())
    assert angle_alignment(left, right).max() <= 2 ** 0.5 + 1e-6  # Re + Im of a unit-scale quotient


@pytest.mark.parametrize("kind", ["cosent", "angle"])
def test_gradient_steps_learn_the_gold_order(kind):
    torch.manual_seed(0)
    left, right = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    scores = torch.arange(8, dtype=torch.float32)
    loss_fn = GradedPairLoss(kind, temperature=0.05)
    optimizer = torch.optim.Adam([left, right], lr=0.05)

    def rank_agreement():
        cosine = torch.nn.functional.cosine_similarity(left, right, dim=-1).detach()
        return float(torch.corrcoef(torch.stack([cosine.argsort().argsort().float(), scores]))[0, 1])

    before, first = rank_agreement(), loss_fn(left, right, scores=scores).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss_fn(left, right, scores=scores).backward()
        optimizer.step()
    assert loss_fn(left, right, scores=scores).item() < first / 4
    assert rank_agreement() > max(before, 0.9)


def test_graded_loss_needs_scores_and_one_second_sentence_per_pair():
    loss_fn = GradedPairLoss("cosent")
    with pytest.raises(ValueError, match="gold scores"):
        loss_fn(torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="hard_negatives: 0"):
        loss_fn(torch.ones(2, 4), torch.ones(4, 4), scores=torch.ones(2))


@pytest.mark.parametrize("kind", ["cosent", "angle"])
def test_gradcache_equals_the_full_batch(tiny_qwen2, kind):
    embedder = Embedder.from_pretrained(tiny_qwen2, pooling="mean", torch_dtype=torch.float32).train()
    texts = ["A man plays a guitar.", "A cat sits.", "The dog runs far.", "Proteins fold.", "Rain falls.", "Paris."]
    queries = embedder.tokenize(texts)
    documents = embedder.tokenize(list(reversed(texts)), kind="document")
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0])
    loss_fn = GradedPairLoss(kind)
    grads = []
    for chunk in (None, 2):
        embedder.zero_grad()
        torch.manual_seed(0)
        gradcache_backward(embedder, [queries, documents], lambda e: loss_fn(e[0], e[1], scores=scores), chunk)
        grads.append({n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():  # relative to the tensor: summation order moves single elements
        assert (grads[1][name] - grad).norm() <= 1e-5 * grad.norm(), name


SCORED = "score\tsentence1\tsentence2\n" + "".join(
    f"{i % 6}\tA {s} is on the mat number {i}.\tA {s} {'sits' if i % 2 else 'lies'} near mat {i}.\n"
    for i, s in enumerate(["man", "cat", "dog", "chef", "bird", "fox", "cow", "owl"]))


def write_recipe(directory, base, stage: str):
    (directory / "sts.tsv").write_text(SCORED)
    (directory / "rows.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n"
                                                  for i in range(8)))
    path = directory / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{base: {base}, max_length: 32, dtype: float32}}
        output_dir: {directory / 'run'}
        report_to: []
        stages:
          - {stage}
    """))
    return path


def test_a_cosent_stage_trains_on_every_scored_pair(tiny_qwen2, tmp_path):
    from llm2emb.train.runner import train

    recipe = write_recipe(tmp_path, tiny_qwen2, "{name: sts, loss: angle, max_steps: 2, batch_size: 4, "
                                                "datasets: [{path: sts.tsv, format: scored_pairs}]}")
    summary = train(recipe)
    assert summary.steps == 2 and summary.stages[0]["final_loss"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert Embedder.from_pretrained(tmp_path / "run" / "model").encode(["a cat"]).shape == (1, 64)


@pytest.mark.parametrize("stage, message", [
    ("{name: s, loss: cosent, max_steps: 1, hard_negatives: 1, datasets: [{path: sts.tsv, format: scored_pairs}]}",
     "stages[0].hard_negatives: loss cosent ranks pairs: set hard_negatives: 0"),
    ("{name: s, loss: cosent, max_steps: 1, datasets: [{path: rows.jsonl}]}",
     "stages[0].datasets[0].format: loss cosent needs graded pairs: format scored_pairs, got jsonl"),
    ("{name: s, loss: angle, max_steps: 1, hardness_weight: 1.0, datasets: [{path: sts.tsv, format: scored_pairs}]}",
     "stages[0].hardness_weight: acts on InfoNCE's negatives; loss angle has none"),
])
def test_a_graded_stage_refuses_what_it_cannot_run(tiny_qwen2, tmp_path, stage, message):
    with pytest.raises(UserError) as caught:
        load_recipe(write_recipe(tmp_path, tiny_qwen2, stage))
    assert str(caught.value).endswith(message)
