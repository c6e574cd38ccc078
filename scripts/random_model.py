"""A randomly initialised model of a real architecture's shape, converted into an llm2emb folder, for speed benchmarks.

Speed depends on the shape, not on the weights, and no hub is reachable, so the GPU benchmarks time models of the
real shapes with random weights. The tokenizer comes from an existing folder (e.g. SmolLM2's, vocabulary 49152, which
fits every shape below), so every shape sees the same token counts for the same texts.

    python -m scripts.random_model --shape qwen2.5-1.5b --tokenizer /tmp/smol-emb --out /tmp/qwen-1.5b-emb
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, LlamaConfig, Qwen2Config

from llm2emb.commands.convert import convert

SHAPES = {
    # Not a real model: a SmolLM2-vocabulary model small enough that tokenization and I/O, not the model, dominate
    # (memory and streaming benchmarks).
    "tiny-llama": (LlamaConfig, dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     max_position_embeddings=8192)),
    "smollm2-135m": (LlamaConfig, dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                       rope_theta=100000.0, max_position_embeddings=8192)),
    "qwen2.5-0.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_theta=1000000.0, max_position_embeddings=32768)),
    "qwen2.5-1.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_theta=1000000.0, max_position_embeddings=32768)),
    "qwen2.5-7b": (Qwen2Config, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                                     rope_theta=1000000.0, max_position_embeddings=32768)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make(shape: str, tokenizer: Path, out: Path, dtype: str = "bfloat16", pooling: str = "mean") -> Path:
    config_class, fields = SHAPES[shape]
    config = config_class(**fields)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 7B parameters on a CPU takes minutes
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModel.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp)
        del model
        for name in TOKENIZER_FILES:  # no chat template: embedders tokenize plain text
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, Path(tmp) / name)
        convert(tmp, out, pooling=pooling, dtype=dtype, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder holding tokenizer.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--pooling", default="mean", choices=["mean", "last_token"])
    args = parser.parse_args()
    print(make(args.shape, args.tokenizer, args.out, args.dtype, args.pooling))


if __name__ == "__main__":
    main()
