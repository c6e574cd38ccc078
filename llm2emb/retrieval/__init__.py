"""Retrieval tools over an Embedder's vectors: corpora, chunks, output precision and MUVERA."""
