"""launch.json: what one launch submitted. Written by the launcher, read by status/logs/cancel and report.

Job ids are Slurm's (an array task is "<array_job_id>_<point index>"), or submitit's local ids on the
local backend. The manifest holds no secrets and no environment: only ids, overrides and paths.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic

MANIFEST = "launch.json"


@dataclass
class PointRecord:
    index: int
    overrides: list[str]
    dir: str  # relative to the run dir, e.g. "p000"


@dataclass
class JobRecord:
    stage: str  # train | merge | eval | report
    job_id: str  # Slurm job id (array job id for arrays)
    array: bool
    points: list[int]  # the sweep points this job serves (array task i = point i); [] for report
    log_dir: str  # relative to the run dir, e.g. "slurm/train"
    dependency: str | None = None  # e.g. "aftercorr:1234"
    job_name: str = ""

    def task_ids(self) -> list[str]:
        return [f"{self.job_id}_{p}" for p in self.points] if self.array else [self.job_id]


@dataclass
class Manifest:
    name: str
    created: str
    backend: str  # local | slurm
    run_dir: str  # absolute
    points: list[PointRecord] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)
    launch_id: str = ""  # the tag every job carries in its sbatch --comment
    # package version, git SHA, sha256 of the installed distributions (gptoss_hpc.provenance)
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self) -> Path:
        path = Path(self.run_dir) / MANIFEST
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise GptossHpcError(f"{path} not found: {run_dir} is not a gptoss_hpc launch directory")
        raw = json.loads(path.read_text())
        return cls(
            name=raw["name"],
            created=raw["created"],
            backend=raw["backend"],
            run_dir=raw["run_dir"],
            points=[PointRecord(**p) for p in raw.get("points", [])],
            jobs=[JobRecord(**j) for j in raw.get("jobs", [])],
            launch_id=raw.get("launch_id", ""),
            provenance=raw.get("provenance", {}),
        )

    def job(self, stage: str) -> JobRecord | None:
        return next((j for j in self.jobs if j.stage == stage), None)
