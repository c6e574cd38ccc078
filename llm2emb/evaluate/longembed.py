"""LongEmbed's synthetic long-document tasks, generated locally at any length: passkey and needle retrieval.

Each task holds `documents` texts of `length` tokens (the model's tokenizer counts them) that differ only in one
sentence hidden at a random depth: a person's pass key in filler text (passkey), or the best thing to do in a city
in a haystack of real prose (needle). Query i asks for the hidden fact of document i, so the model must find one
sentence anywhere in a long text: nDCG@1 is the share of queries whose own document ranks first (LongEmbed's score
for these tasks). Everything is drawn from a seed, so a length and seed give the same task on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llm2emb.errors import UserError
from llm2emb.evaluate.data import BeirData, corpus_hash

KINDS = ("passkey", "needle")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FIRST_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kavya",
               "Liam", "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tomas", "Uma", "Viktor", "Wen",
               "Ximena", "Yusuf", "Zofia", "Amara", "Bjorn", "Carmen", "Dara")
LAST_NAMES = ("Abe", "Berg", "Costa", "Dahl", "Evans", "Fischer", "Garcia", "Haddad", "Ivanova", "Jensen", "Kim",
              "Lopez", "Moreau", "Novak", "Okafor", "Park", "Quinn", "Rossi", "Silva", "Tanaka")
CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tbilisi", "Hobart", "Bergen", "Cusco", "Da Nang", "Essaouira",
          "Fes", "Galway", "Hanoi", "Ibiza", "Jaipur", "Kotor", "Ljubljana", "Medellin", "Nafplio", "Oaxaca",
          "Porto", "Queenstown", "Riga", "Sintra", "Tallinn", "Ushuaia", "Valparaiso", "Wellington", "Yazd", "Zadar")
ACTIVITIES = ("eating a sandwich in the park on a sunny day", "climbing the old lighthouse at dawn",
              "swimming in the cold river after lunch", "reading in the library by the harbour",
              "cycling along the coast road at sunset", "tasting the cheese at the Sunday market",
              "watching the boats from the north pier", "walking the city walls before breakfast",
              "listening to street music in the main square", "taking the night train into the mountains")


def _keys(kind: str, count: int, rng: random.Random) -> list[str]:
    if kind == "passkey":
        pool = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    else:
        pool = [f"{city} {district}" for city in CITIES for district in ("Old Town", "Harbour", "Hills", "Centre")]
    if count > len(pool):
        raise UserError(f"{kind}: at most {len(pool)} documents per length, asked for {count}")
    return rng.sample(pool, count)


def long_task(
    kind: str,
    tokenizer,
    length: int,
    documents: int = 50,
    seed: int = 0,
    haystack: Sequence[str] | None = None,
) -> BeirData:
    """One task: `documents` texts of about `length` tokens, each hiding the fact its query asks for.

    `haystack` (needle): prose to hide the needles in (e.g. a corpus's documents; they are concatenated from a
    random start for each document); the passkey task always uses LongEmbed's repeated filler sentences.
    """
    if kind not in KINDS:
        raise UserError(f"long task {kind!r}: expected one of {', '.join(KINDS)}")
    if documents < 2:
        raise UserError(f"{kind}: at least 2 documents per length, got {documents}")
    rng = random.Random(f"{kind}:{length}:{documents}:{seed}")
    doc_ids, texts, query_ids, queries, qrels = [], [], [], [], {}
    for index, key in enumerate(_keys(kind, documents, rng)):
        if kind == "passkey":
            fact = f"{key}'s pass key is {rng.randint(10000, 99999)}. Remember it."
            query = f"What is {key}'s pass key?"
            filler = PASSKEY_FILLER
        else:
            fact = f"The best thing to do in {key} is {rng.choice(ACTIVITIES)}."
            query = f"What is the best thing to do in {key}?"
            if not haystack:
                raise UserError("needle: give haystack texts (real prose) to hide the needles in")
            start = rng.randrange(len(haystack))
            filler = " ".join(haystack[start:]) + " " + " ".join(haystack[:start])
        text = _hide(fact, filler, tokenizer, length, rng)
        doc_ids.append(f"{kind}-{length}-d{index}")
        texts.append(text)
        query_ids.append(f"{kind}-{length}-q{index}")
        queries.append(query)
        qrels[query_ids[-1]] = {doc_ids[-1]: 1.0}
    return BeirData(f"{kind}@{length}", "test", doc_ids, texts, query_ids, queries, qrels, corpus_hash(doc_ids, texts))


def _hide(fact: str, filler: str, tokenizer, length: int, rng: random.Random) -> str:
    """Filler cut to `length` tokens with the fact inserted at a random sentence boundary."""
    fact_tokens = len(tokenizer(fact, add_special_tokens=False)["input_ids"]) + 1
    budget = max(length - fact_tokens, 0)
    sample = filler
    while len(sample) < 8 * length:  # enough characters for `length` tokens of any tokenizer
        sample += " " + filler
    offsets = tokenizer(sample, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = offsets[budget - 1][1] if budget else 0
    context = sample[:cut].strip()
    boundaries = [0] + [i + 2 for i in range(len(context) - 1) if context[i] in ".!?" and context[i + 1] == " "]
    where = rng.choice(boundaries)
    return (context[:where] + fact + " " + context[where:]).strip()
