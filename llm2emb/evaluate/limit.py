"""LIMIT ("On the Theoretical Limitations of Embedding-Based Retrieval"), generated locally as the paper builds it.

Documents are people and the things they like ("Ada Kofi Moreau likes striped quokkas, ... and amber kites.");
queries ask "Who likes striped quokkas?". The relevant sets are every k-subset of `core` people (k = 2, 46 people:
all 1,035 pairs), each pair given a thing that exactly those people like, so a retriever must be able to rank every
pair of the 46 above all others. The paper shows that the number of such top-k sets a d-dimensional embedding can
realise is bounded by d, and that embedders fail LIMIT while lexical search does not. The small version is the core
documents alone; the large one adds distractor people (liking things no query asks for) up to 50,000 documents.
"""

from __future__ import annotations

import itertools
import random

from llm2emb.errors import UserError
from llm2emb.evaluate.data import BeirData, corpus_hash

SIZES = {"small": None, "large": 50_000}
"""Documents in all: small is the core people alone."""
SYLLABLES = ("ba", "ko", "ri", "mu", "te", "la", "zo", "ni", "pe", "su", "da", "vi", "go", "ru", "fe", "ma", "ti", "no",
             "ke", "lu")
"""Things are made-up three-syllable words ("kolari", "zomupe"): each is one distinct word, so a lexical match is
exact, as it is for the paper's liked items; no query's thing appears in any other document."""
FIRST = ("Ada", "Bram", "Cleo", "Dev", "Esme", "Finn", "Gia", "Hugo", "Iris", "Joel", "Kira", "Leon", "Mina", "Nico",
         "Orla", "Pavel", "Rhea", "Sami", "Tess", "Ugo", "Vera", "Wade", "Xena", "Yara", "Zane", "Aiko", "Boris",
         "Cyra", "Dario", "Elif", "Femi", "Greta", "Hana", "Ivo", "Juno", "Kofi", "Lena", "Milo", "Noor", "Otto")
LAST = ("Moreau", "Okafor", "Tanaka", "Novak", "Silva", "Berg", "Haddad", "Ivanova", "Quinn", "Rossi", "Costa",
        "Dahl", "Evans", "Fischer", "Garcia", "Jensen", "Kim", "Lopez", "Park", "Abe", "Brandt", "Chen", "Dubois",
        "Eriksen", "Farah", "Gomez", "Holm", "Ito", "Jovanovic", "Kowalski", "Lind", "Mensah", "Nakamura", "Olsen",
        "Petrov", "Reyes", "Sato", "Torres", "Ueda", "Varga")


def limit_task(size: str = "small", core: int = 46, k: int = 2, seed: int = 0) -> BeirData:
    """The LIMIT task: `core` people whose every k-subset is one query's relevant set, plus (large) distractors."""
    if size not in SIZES:
        raise UserError(f"LIMIT size {size!r}: expected small or large")
    subsets = list(itertools.combinations(range(core), k))
    rng = random.Random(f"limit:{size}:{core}:{k}:{seed}")
    words = ["".join(parts) for parts in itertools.product(SYLLABLES, repeat=3)]
    rng.shuffle(words)
    if len(subsets) > len(words) // 2:
        raise UserError(f"LIMIT: {len(subsets)} {k}-subsets of {core} people need more than the {len(words) // 2} "
                        "things available")
    query_things, distractor_pool = words[:len(subsets)], words[len(subsets):]
    total = max(SIZES[size] or core, core)
    names = [f"{first} {middle} {last}" for first in FIRST for middle in FIRST if middle != first for last in LAST]
    people = rng.sample(names, total)
    liked: list[list[str]] = [[] for _ in range(total)]
    for thing, subset in zip(query_things, subsets):
        for person in subset:
            liked[person].append(thing)
    per_person = round(len(subsets) * k / core)
    for person in range(core, total):  # distractors like things no query asks for: never relevant
        liked[person] = rng.sample(distractor_pool, per_person)
    documents = []
    for name, likes in zip(people, liked):
        rng.shuffle(likes)
        documents.append(f"{name} likes {', '.join(likes[:-1])} and {likes[-1]}.")
    order = rng.sample(range(total), total)  # the core people are not the first documents
    doc_ids = [f"limit-d{position}" for position in range(total)]
    position_of = {person: position for position, person in enumerate(order)}
    texts = [documents[person] for person in order]
    query_ids = [f"limit-q{i}" for i in range(len(subsets))]
    queries = [f"Who likes {thing}?" for thing in query_things]
    qrels = {query_id: {doc_ids[position_of[person]]: 1.0 for person in subset}
             for query_id, subset in zip(query_ids, subsets)}
    return BeirData(f"limit-{size}", "test", doc_ids, texts, query_ids, queries, qrels, corpus_hash(doc_ids, texts))
