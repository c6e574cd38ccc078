"""LongEmbed's synthetic tasks: documents of the asked token length, one hidden fact each, queries that ask for it."""

import pytest

from llm2emb.errors import UserError
from llm2emb.evaluate.longembed import PASSKEY_FILLER, long_task
from tests.conftest import build_tokenizer

HAYSTACK = ["Proteins fold into shapes. Enzymes speed reactions.", "Rivers carry silt to the sea. Deltas form.",
            "Stars burn hydrogen for billions of years. Some end as white dwarfs."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("kind", ["passkey", "needle"])
@pytest.mark.parametrize("length", [64, 300])
def test_documents_have_the_length_and_hide_their_fact_once(tokenizer, kind, length):
    task = long_task(kind, tokenizer, length, documents=8, seed=3, haystack=HAYSTACK)
    assert len(task.documents) == len(task.queries) == 8 and task.name == f"{kind}@{length}"
    for query_id, query in zip(task.query_ids, task.queries):
        [(doc_id, score)] = task.qrels[query_id].items()
        document = task.documents[task.doc_ids.index(doc_id)]
        tokens = len(tokenizer(document, add_special_tokens=False)["input_ids"])
        assert abs(tokens - length) <= 3, (tokens, length)
        key = query.removeprefix("What is ").removeprefix("the best thing to do in ").removesuffix("'s pass key?")
        key = key.removesuffix("?")
        assert document.count(key) == 1  # found only in its own document's fact
        assert sum(key in other for other in task.documents) == 1
    if kind == "passkey":
        assert PASSKEY_FILLER.split(". ")[0] in task.documents[0]
    again = long_task(kind, tokenizer, length, documents=8, seed=3, haystack=HAYSTACK)
    assert again.documents == task.documents and again.queries == task.queries
    other = long_task(kind, tokenizer, length, documents=8, seed=4, haystack=HAYSTACK)
    assert other.documents != task.documents


def test_bad_requests_say_what_is_wrong(tokenizer):
    with pytest.raises(UserError, match="expected one of passkey, needle"):
        long_task("haystack", tokenizer, 64)
    with pytest.raises(UserError, match="needle: give haystack texts"):
        long_task("needle", tokenizer, 64)
    with pytest.raises(UserError, match="at most 600 documents"):
        long_task("passkey", tokenizer, 64, documents=601)
