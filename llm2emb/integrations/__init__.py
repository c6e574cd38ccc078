"""Bridges to other tools: mteb's encoder protocol and the pooling module shipped in sentence-transformers exports."""
