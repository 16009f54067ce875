"""The o200k_base vocabulary gpt-oss uses, from the bpe-openai package: no Hub, no download.

openai-harmony reads it from ``TIKTOKEN_ENCODINGS_BASE``; the offline tokenizer builder reads the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import cache_root

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE = "o200k_base.tiktoken"


def o200k_dir() -> Path:
    """A folder holding o200k_base.tiktoken (verified by SHA-256), unpacked once from bpe-openai."""
    folder = cache_root() / "tiktoken"
    target = folder / O200K_FILE
    if target.is_file() and _sha256(target) == O200K_SHA256:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = resources.files("bpe_openai.data") / f"{O200K_FILE}.gz"
    data = gzip.decompress(src.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise GptossHpcError(
            f"bpe-openai's {O200K_FILE}.gz has SHA-256 {digest}, not the o200k_base gpt-oss uses "
            f"({O200K_SHA256}); reinstall bpe-openai==0.1.4"
        )
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return folder


def use_offline_harmony_vocab() -> Path:
    """Point openai-harmony at the local vocabulary (it would otherwise download it)."""
    folder = o200k_dir()
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(folder))
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
