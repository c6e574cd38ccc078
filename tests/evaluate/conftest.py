"""A small real encoder for evaluation tests: hashed character trigrams, fast enough for all of SciFact."""

import hashlib
import json

import numpy as np
import pytest


class TrigramEncoder:
    """Bag of hashed character trigrams; counts how many texts each method encoded."""

    def __init__(self, dim: int = 256, salt: str = ""):
        self.dim, self.salt = dim, salt
        self.calls = {"encode": 0, "queries": 0, "documents": 0}
        self.instructions = []

    def fingerprint(self) -> str:
        return f"trigram-{self.dim}-{self.salt}"

    def _vectors(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            text = f"  {text.lower()} "
            for i in range(len(text) - 2):
                h = hashlib.blake2b((self.salt + text[i : i + 3]).encode(), digest_size=4).digest()
                out[row, int.from_bytes(h, "little") % self.dim] += 1.0
        return out

    def encode(self, texts, batch_size=32):
        self.calls["encode"] += len(texts)
        return self._vectors(texts)

    def encode_queries(self, texts, instruction=None):
        self.calls["queries"] += len(texts)
        self.instructions.append(instruction)
        return self._vectors(texts)

    def encode_documents(self, texts):
        self.calls["documents"] += len(texts)
        return self._vectors(texts)


@pytest.fixture
def trigram_encoder():
    """The TrigramEncoder class (tests build several, with different salts)."""
    return TrigramEncoder


def _write_beir(directory, corpus, queries, qrels, split="test"):
    """Write a BEIR folder: corpus [(id, title, text)], queries [(id, text)], qrels [(qid, did, score)]."""
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with (directory / "corpus.jsonl").open("w") as f:
        for doc_id, title, text in corpus:
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (directory / "queries.jsonl").open("w") as f:
        for qid, text in queries:
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (directory / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def write_beir():
    return _write_beir
