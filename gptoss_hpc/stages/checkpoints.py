"""Checkpoint discovery for the train stage: the newest complete ``train/checkpoint-N`` a run resumes from."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(train_dir: Path) -> Path | None:
    """The newest complete checkpoint-N: trainer_state.json (written last by the HF Trainer) parses and says
    global_step N, weights are there, and DeepSpeed's `latest` tag (if any) points at an existing folder."""
    found: list[tuple[int, Path]] = []
    for d in train_dir.glob("checkpoint-*") if train_dir.is_dir() else []:
        m = _CHECKPOINT_RE.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for step, d in sorted(found, reverse=True):
        if _complete(d, step):
            return d
        log.warning("skipping incomplete checkpoint %s", d)
    return None


def _complete(d: Path, step: int) -> bool:
    try:
        state = json.loads((d / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if state.get("global_step") != step or not any(d.glob("*.safetensors")):
        return False
    latest = d / "latest"
    if latest.is_file():
        return (d / latest.read_text().strip()).is_dir()
    return (d / "optimizer.pt").is_file()
