"""The files of a run directory, read without Slurm: status/<stage>.json, eval.json, metrics.jsonl, a point's
log files and their tails. Part of the one reader of run directories (gptoss_hpc.monitor.state)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptoss_hpc.paths import RunPaths
from gptoss_hpc.submission.manifest import JobRecord

STDERR_TAIL_LINES = 10
_TAIL_BYTES = 16384


def tail_lines(path: str | Path, n: int = STDERR_TAIL_LINES) -> list[str]:
    """The last n lines of a text file (reads at most 16 KiB); [] if it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]  # first line is probably cut
    return [ln.rstrip() for ln in lines if ln.strip()][-n:]


def last_metrics(path: str | Path) -> tuple[int | None, float | None]:
    """Last logged (step, loss) of a metrics.jsonl (JSON lines with "step" and "loss")."""
    step: int | None = None
    loss: float | None = None
    for line in reversed(tail_lines(path, 50)):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if step is None and isinstance(rec.get("step"), int | float):
            step = int(rec["step"])
        if loss is None and isinstance(rec.get("loss"), int | float):
            loss = float(rec["loss"])
        if step is not None and loss is not None:
            break
    return step, loss


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file (status/<stage>.json, eval/eval.json); None when missing, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_stage_status(run_dir: Path, point: int, stage: str) -> dict[str, Any] | None:
    """pNNN/status/<stage>.json: the stage's own record (state, error, warnings, host)."""
    return read_json(RunPaths(run_dir).point(point).stage_status(stage))


def read_metrics(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training rows of metrics.jsonl; a torn last line is ignored."""
    steps: list[int] = []
    losses: list[float] = []
    if not path.is_file():
        return steps, losses
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), int | float) and "step" in row:
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def point_log_files(run: RunPaths, job: JobRecord | None, stage: str, point: int) -> list[Path]:
    """The stage's log files for one point, stderr first: array task logs <array>_<point>_*_log.*, or (one job
    per point) the job at the point's position in the manifest's id list."""
    folder = run.slurm(stage)
    if not folder.is_dir():
        return []
    patterns: list[str] = []
    if job is not None and job.array:
        patterns.append(f"{job.job_id}_{point}_*_log.*")
    elif job is not None:
        ids = [i for i in job.job_id.split(",") if i]
        if len(ids) == len(job.points) and point in job.points:
            patterns.append(f"{ids[job.points.index(point)]}_*_log.*")
        elif len(ids) == 1:
            patterns.append(f"{ids[0]}_*_log.*")
    else:
        patterns.append(f"*_{point}_*_log.*")
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(folder.glob(pattern), key=lambda p: (p.suffix != ".err", p.name)))
    return found


def log_tail(files: Sequence[Path], lines: int = STDERR_TAIL_LINES) -> list[str]:
    """'<name>:' and the last non-empty lines of the first log file (stderr first) that has any."""
    for path in files:
        kept = tail_lines(path, lines)
        if kept:
            return [f"{path.name}:", *kept]
    return []
