"""Distillation from a teacher embedder: the loss terms, the cached teacher, GradCache and a real training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import TrainingArguments

from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder
from llm2emb.train.contrastive import trainer_options
from llm2emb.train.data import ContrastiveCollator, StageData, load_rows
from llm2emb.train.distillation import Distillation, kl_divergence, margin_mse
from llm2emb.train.losses import InfoNCELoss, candidate_mask
from llm2emb.train.recipe import DatasetSpec, StageSpec
from llm2emb.train.recipe_file import validate_recipe
from llm2emb.train.teacher import load_teacher
from llm2emb.train.trainer import ContrastiveTrainer

SUBJECTS = ["man", "woman", "cat", "dog", "chef", "enzyme", "protein", "capital", "guitar", "onion", "street", "mat"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "triplets.jsonl"
    rows = [{"query": f"Is the {s} on the street?", "positive": f"A {s} is on the street.",
             "negative": f"No {s} is here, the {SUBJECTS[i - 1]} is."} for i, s in enumerate(SUBJECTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher_folder(tiny_st_teacher) -> Path:
    return tiny_st_teacher


def stage(data_file: Path, **keys) -> StageSpec:
    return StageSpec.model_validate(
        {"name": "s", "max_steps": 2, "hard_negatives": 1, "datasets": [{"path": str(data_file)}], **keys},
        context={"base_dir": data_file.parent},
    )


# ---- the terms -------------------------------------------------------------------------------------------------


def scores_and_mask(b: int = 3, k: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.rand(b, b * (1 + k), generator=generator) * 2 - 1
    teacher = torch.rand(b, b * (1 + k), generator=generator) * 2 - 1
    mask = torch.ones(b, b * (1 + k), dtype=torch.bool)
    mask[0, 1] = False  # an in-batch negative left out (say, a copy of query 0's positive)
    mask[2, b + 2 * k + 1] = False  # one of query 2's own hard negatives left out
    return student, teacher, mask


def test_kl_is_the_textbook_divergence_over_the_unmasked_candidates():
    student, teacher, mask = scores_and_mask()
    t = 0.05
    want = 0.0
    for i in range(student.shape[0]):
        keep = mask[i]
        p = torch.softmax(teacher[i, keep] / t, 0)
        q = torch.softmax(student[i, keep] / t, 0)
        want += float((p * (p.log() - q.log())).sum())
    want /= student.shape[0]
    assert kl_divergence(student, teacher, mask, t).item() == pytest.approx(want, rel=1e-5)
    assert kl_divergence(teacher, teacher, mask, t).item() == pytest.approx(0.0, abs=1e-6)
    assert want > 0.01  # the example is not degenerate


def test_margin_mse_compares_margins_on_each_querys_own_hard_negatives():
    student, teacher, mask = scores_and_mask(b=3, k=2)
    t = 0.1
    pairs = []
    for i in range(3):
        for j in range(2):
            column = 3 + i * 2 + j
            if mask[i, column]:
                gap_s = (student[i, i] - student[i, column]) / t
                gap_t = (teacher[i, i] - teacher[i, column]) / t
                pairs.append(float(gap_s - gap_t) ** 2)
    assert len(pairs) == 5
    assert margin_mse(student, teacher, mask, t).item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    # Shifting a query's scores by a constant leaves its margins, hence the term, unchanged.
    assert margin_mse(student + 0.3, teacher, mask, t).item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    with pytest.raises(ValueError, match="needs hard negatives"):
        margin_mse(student[:, :3], teacher[:, :3], mask[:, :3], t)


def embeddings(seed: int, b: int = 4, k: int = 1, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, generator=generator), torch.randn(b * (1 + k), dim, generator=generator)


def test_infonce_with_distillation_adds_the_weighted_terms():
    queries, documents = embeddings(0)
    teacher_q, teacher_d = embeddings(1, dim=5)  # another width: only the teacher's own cosines are used
    ids_q, ids_d = torch.arange(4), 100 + torch.arange(8)
    plain = InfoNCELoss(0.05)(queries, documents, ids_q, ids_d)
    taught = InfoNCELoss(0.05, distillation=Distillation(kl_weight=0.5, margin_weight=2.0, temperature=0.1,
                                                         infonce_weight=0.25))
    got = taught(queries, documents, ids_q, ids_d, teacher_queries=teacher_q, teacher_documents=teacher_d)
    student = InfoNCELoss.similarity(queries, documents)
    teacher = InfoNCELoss.similarity(teacher_q, teacher_d)
    mask = candidate_mask(ids_q, ids_d, torch.tensor(True))
    want = 0.25 * plain + 0.5 * kl_divergence(student, teacher, mask, 0.1) + 2.0 * margin_mse(student, teacher, mask, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="teacher_queries and teacher_documents"):
        taught(queries, documents, ids_q, ids_d)
    with pytest.raises(ValueError, match="teacher_queries and teacher_documents"):
        InfoNCELoss(0.05)(queries, documents, ids_q, ids_d, teacher_queries=teacher_q, teacher_documents=teacher_d)


def test_kl_gradient_moves_the_student_towards_the_teacher():
    queries, documents = embeddings(0)
    queries.requires_grad_(True)
    teacher_q, teacher_d = embeddings(1)
    ids_q, ids_d = torch.arange(4), 100 + torch.arange(8)
    loss = InfoNCELoss(0.05, distillation=Distillation(kl_weight=1.0, infonce_weight=0.0))
    before = loss(queries, documents, ids_q, ids_d, teacher_queries=teacher_q, teacher_documents=teacher_d)
    before.backward()
    with torch.no_grad():
        moved = queries - 0.05 * queries.grad
    after = loss(moved, documents, ids_q, ids_d, teacher_queries=teacher_q, teacher_documents=teacher_d)
    assert after.item() < before.item() - 1e-3


# ---- the teacher -----------------------------------------------------------------------------------------------


def test_teacher_embeds_each_text_once_with_its_own_tokenizer(teacher_folder):
    teacher = load_teacher(str(teacher_folder), "stages[0].teacher.model")
    reference = SentenceTransformer(str(teacher_folder), device="cpu")
    texts = ["A cat sat on the mat.", "A man plays a guitar.", "A cat sat on the mat."]
    got = teacher.vectors(texts, "document")
    assert teacher.embedded == 2 and got.shape == (3, 64) and got.dtype == torch.float32
    want = torch.from_numpy(reference.encode_document(texts[:2], convert_to_numpy=True))
    torch.testing.assert_close(got[:2], F.normalize(want, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], got[0])
    teacher.vectors(["A man plays a guitar.", "The dog barks."], "document")  # one new text: one more embedded
    assert teacher.embedded == 3
    teacher.vectors(["A man plays a guitar."], "query", ["Find the scene"])  # a query is another kind of text
    assert teacher.embedded == 4


def test_teacher_instructions_are_part_of_the_cached_text(teacher_folder):
    teacher = load_teacher(str(teacher_folder), "t", instructions=True)
    plain = teacher.vectors(["A cat sat."], "query", [None])
    told = teacher.vectors(["A cat sat."], "query", ["Given a scene, retrieve a caption"])
    assert teacher.embedded == 2 and not torch.allclose(plain, told, atol=1e-4)
    ignoring = load_teacher(str(teacher_folder), "t", instructions=False)
    ignoring.vectors(["A cat sat."], "query", [None])
    ignoring.vectors(["A cat sat."], "query", ["Given a scene, retrieve a caption"])
    assert ignoring.embedded == 1


def test_a_folder_that_is_no_embedder_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^stages\[1\]\.teacher\.model: .*empty could not be loaded"):
        load_teacher(str(tmp_path / "empty"), "stages[1].teacher.model")


# ---- in the trainer ---------------------------------------------------------------------------------------------


def student(base: Path) -> Embedder:
    torch.manual_seed(0)
    return Embedder.from_pretrained(base, pooling="mean")


def make_trainer(model, data_file, out, chunk, options, max_steps=1, learning_rate=5e-5) -> ContrastiveTrainer:
    spec = DatasetSpec.model_validate({"path": str(data_file)}, context={"base_dir": data_file.parent})
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, learning_rate=learning_rate, seed=0)
    return ContrastiveTrainer(model=model, args=args, gradcache_chunk=chunk,
                              train_dataset=StageData([load_rows(spec)], batch_size=6, hard_negatives=1, seed=3),
                              data_collator=ContrastiveCollator(model, keep_texts=options["teacher"] is not None),
                              **options)


def test_gradcache_with_a_teacher_gives_the_full_batch_gradients(
    step_gradients, tiny_qwen2, data_file, teacher_folder, tmp_path
):
    spec = stage(data_file, teacher={"model": str(teacher_folder), "kl_weight": 1.0, "margin_weight": 0.5})
    grads, teachers = {}, {}
    for chunk in (None, 2):
        model = student(tiny_qwen2)
        options = trainer_options(spec, model, 0)
        teachers[chunk] = options["teacher"]
        grads[chunk] = step_gradients(make_trainer(model, data_file, tmp_path / str(chunk), chunk, options))
    plain_model = student(tiny_qwen2)
    plain = step_gradients(make_trainer(plain_model, data_file, tmp_path / "plain", None,
                                        trainer_options(stage(data_file), plain_model, 0)))
    assert teachers[2].embedded == 6 + 12  # 6 queries and 12 documents, each once
    for name, want in grads[None].items():
        assert want.abs().sum() > 0, name
        assert ((grads[2][name] - want).norm() / want.norm()).item() < 1e-5, name
    assert any(((grads[None][n] - plain[n]).norm() / plain[n].norm()).item() > 1e-2 for n in plain)


def batch_kl(model, trainer, batch) -> float:
    with torch.no_grad():
        q, d = model(batch["queries"]), model(batch["documents"])
        teacher = trainer.teacher_embeddings(batch)
        mask = candidate_mask(batch["query_ids"], batch["document_ids"], torch.tensor(True))
        return kl_divergence(InfoNCELoss.similarity(q, d),
                             InfoNCELoss.similarity(teacher["teacher_queries"], teacher["teacher_documents"]),
                             mask, 0.05).item()


def test_training_on_the_kl_alone_brings_the_student_to_the_teachers_scores(tiny_qwen2, data_file, teacher_folder,
                                                                          tmp_path):
    spec = stage(data_file, teacher={"model": str(teacher_folder), "infonce_weight": 0.0})
    model = student(tiny_qwen2)
    options = trainer_options(spec, model, 0)
    trainer = make_trainer(model, data_file, tmp_path, 3, options, max_steps=12, learning_rate=2e-3)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    before = batch_kl(model, trainer, batch)
    trainer.train()
    model.eval()
    after = batch_kl(model, trainer, batch)
    assert math.isfinite(before) and after < 0.5 * before
    assert options["teacher"].embedded <= 2 * len(SUBJECTS) + len(SUBJECTS)  # queries, positives, negatives once


# ---- the recipe -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"teacher": {"model": "./missing"}}, r"stages\[0\]\.teacher\.model: \./missing: not found"),
        ({"teacher": {"model": "all-minilm-l6-v2", "kl_weight": 0}},
         r"stages\[0\]\.teacher\.kl_weight: kl_weight and margin_weight are both 0"),
        ({"teacher": {"model": "all-minilm-l6-v2", "margin_weight": 1.0}, "hard_negatives": 0},
         r"stages\[0\]\.teacher\.margin_weight: MarginMSE scores hard negatives: set hard_negatives >= 1"),
        ({"teacher": {"model": "all-minilm-l6-v2", "temperature": 0}},
         r"stages\[0\]\.teacher\.temperature: Input should be greater than 0"),
        ({"teacher": {"model": "all-minilm-l6-v2"}, "objective": "simcse", "hard_negatives": 0},
         r"stages\[0\]\.teacher: objective simcse has no query-document scores to distill"),
    ],
)
def test_bad_teacher_keys_name_their_path(data_file, keys, message):
    raw = {"model": {"base": "smollm2-135m"}, "output_dir": "out",
           "stages": [{"name": "s", "max_steps": 2, "hard_negatives": 1, "datasets": [{"path": str(data_file)}],
                       **keys}]}
    if keys.get("objective") == "simcse":
        text = data_file.parent / "texts.txt"
        text.write_text("one line\nanother line\n")
        raw["stages"][0]["datasets"] = [{"path": str(text)}]
    with pytest.raises(UserError, match=message):
        validate_recipe(raw, base_dir=data_file.parent)


def test_a_graded_stage_refuses_a_teacher(tmp_path):
    scored = tmp_path / "scored.tsv"
    scored.write_text("sentence1\tsentence2\tscore\na\tb\t1.0\n")
    raw = {"model": {"base": "smollm2-135m"}, "output_dir": "out",
           "stages": [{"name": "s", "max_steps": 2, "loss": "cosent", "teacher": {"model": "all-minilm-l6-v2"},
                       "datasets": [{"path": str(scored), "format": "scored_pairs"}]}]}
    with pytest.raises(UserError, match=r"stages\[0\]\.teacher: acts on InfoNCE's negatives; loss cosent has none"):
        validate_recipe(raw, base_dir=tmp_path)
