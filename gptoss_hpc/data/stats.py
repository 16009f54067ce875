"""Token-length statistics of the configured data under the configured tokenizer, and a PNG histogram.

    python -m gptoss_hpc.data stats data=sample model=tiny_gpt_oss
    python -m gptoss_hpc.data stats data=local data.path=train.jsonl model.tokenizer=/path/to/tokenizer

Lengths are measured before the ``train.max_length`` policy (that is what they are for).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptoss_hpc.config.lengths import percentile

log = logging.getLogger(__name__)


def length_stats(lengths: Sequence[int], max_length: int) -> dict[str, Any]:
    values = sorted(lengths)
    over = sum(1 for v in values if v > max_length)
    return {
        "rows": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
        "mean": round(sum(values) / len(values), 1),
        "max_length": max_length,
        "over_max_length": over,
        "share_over_max_length": round(over / len(values), 4),
    }


def write_histogram(lengths: Sequence[int], max_length: int, path: str | Path, title: str = "") -> Path:
    """A histogram of token lengths with train.max_length marked; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4c72b0")
        longest = max(lengths)
        if max_length <= 2 * longest:
            ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"train.max_length={max_length}")
            ax.legend()
        else:  # keep the data readable: the limit is far to the right
            ax.text(
                0.98,
                0.95,
                f"all rows far below train.max_length={max_length}",
                transform=ax.transAxes,
                ha="right",
                va="top",
            )
        ax.set_xlabel("tokens per row (chat template applied)")
        ax.set_ylabel("rows")
        ax.set_title(title or f"{len(lengths)} rows")
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
