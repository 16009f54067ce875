"""Synthetic long-row chat data sets for the long-rows GPU check (issue 27).

    python -m gptoss_hpc.bench.long_rows mix OUT.jsonl          # 600 rows: 90% ~1k tokens, 10% 8k-32k
    python -m gptoss_hpc.bench.long_rows 128k OUT.jsonl         # 8 rows of 120k-127k tokens
    python -m gptoss_hpc.bench.long_rows mix OUT.jsonl --scale 0.03 --rows 48   # CPU-sized

One common English word is about one token (gptoss_hpc.bench.gpu_check_parts.write_chat_rows); each row's
``approx_tokens`` (its word count) is written to OUT.lengths.json, the set's length profile for the FLOP count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from gptoss_hpc.bench.gpu_check_parts import _WORDS

SETS = ("mix", "128k")


def row_lengths(kind: str, rows: int, scale: float = 1.0, seed: int = 0) -> list[int]:
    """Target tokens per row: ``mix``: 9 in 10 log-normal around 1,024 (256..4,096), 1 in 10 uniform in
    8k..32k; ``128k``: uniform in 120k..127k (under gpt-oss's 131,072 positions with the chat template)."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        if kind == "128k":
            n = rng.randint(120_000, 127_000)
        elif i % 10 == 9:
            n = rng.randint(8_192, 32_768)
        else:
            n = int(min(4096, max(256, rng.lognormvariate(math.log(1024), 0.6))))
        out.append(max(8, int(n * scale)))
    return out


def write_long_rows(path: Path, kind: str, rows: int | None = None, scale: float = 1.0, seed: int = 0) -> list[int]:
    """JSONL chat rows (system, user = 10%, assistant = 90% of the words: a reasoning trace) at ``row_lengths``;
    returns the lengths, also written beside the file as ``<name>.lengths.json``."""
    if kind not in SETS:
        raise SystemExit(f"unknown set {kind!r}: choose from {', '.join(SETS)}")
    lengths = row_lengths(kind, rows or (8 if kind == "128k" else 600), scale, seed)
    rng = random.Random(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for n in lengths:
            prompt = max(4, n // 10)
            messages = [
                {"role": "system", "content": "reasoning language: English"},
                {"role": "user", "content": " ".join(rng.choices(_WORDS, k=prompt))},
                {"role": "assistant", "content": " ".join(rng.choices(_WORDS, k=max(4, n - prompt)))},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    path.with_suffix(".lengths.json").write_text(json.dumps(lengths))
    return lengths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench.long_rows", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=SETS)
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=None, help="rows (mix: 600, 128k: 8)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every length (CPU-sized sets)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lengths = write_long_rows(args.out, args.kind, args.rows, args.scale, args.seed)
    print(f"{args.out}: {len(lengths)} rows, {sum(lengths):,} words, longest {max(lengths):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
