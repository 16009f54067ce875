"""The run-directory layout, in one place: every stage, the launcher and the status tools derive paths here.

<run_root>/<name>/<timestamp>/            one launch (the "run dir")
    launch.json                           manifest: points, jobs, job ids (gptoss_hpc.submission.manifest)
    config.yaml                           the launch's base config (the first point's, resolved)
    p000/ p001/ ...                       one folder per sweep point
        config.yaml                       that point's resolved config: what every job of it reads
        base/                             tiny model only: the seeded random base, saved once
        train/                            TRL output_dir: checkpoint-*/, runs/ (TensorBoard)
        adapter/                          final LoRA adapter + tokenizer + deepspeed.json
        metrics.jsonl                     per-step training metrics (JSON lines)
        train_metrics.json                final training metrics (+ what the run cost: tok/s, MFU, peak GiB)
        data.json                         what the data kept: rows read / dropped / truncated (monitor/records.py)
        merged/                           merged bf16 model (sharded safetensors) + model card
        eval/eval.json, eval/generations.jsonl
        status/<stage>.json               written by each stage when it ends (ok / error + message)
    slurm/<stage>/                        submitit folders: sbatch scripts and logs
        <jobid>_<task>_log.out|err        (array jobs: <arrayjobid>_<point>_<rank>_log.out)
    report/report.md, report.json, *.png
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

POINT_PREFIX = "p"


def cache_root() -> Path:
    """$GPTOSS_HPC_CACHE, else ~/.cache/gptoss_hpc: tokenizers built offline, the o200k vocabulary, row lengths."""
    return Path(os.environ.get("GPTOSS_HPC_CACHE", Path.home() / ".cache" / "gptoss_hpc")).expanduser()


def point_dirname(index: int) -> str:
    return f"{POINT_PREFIX}{index:03d}"


@dataclass(frozen=True)
class PointPaths:
    root: Path

    @classmethod
    def from_config(cls, config_path: str | Path) -> PointPaths:
        return cls(Path(config_path).resolve().parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def data_lengths(self) -> Path:
        """What the launch measured of the point's rows and decided for train.max_length (config.lengths)."""
        return self.root / "data_lengths.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "train_metrics.json"

    @property
    def data_record(self) -> Path:
        return self.root / "data.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def status(self) -> Path:
        return self.root / "status"

    def stage_status(self, stage: str) -> Path:
        return self.status / f"{stage}.json"

    @property
    def run_dir(self) -> Path:
        return self.root.parent


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "launch.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def point(self, index: int) -> PointPaths:
        return PointPaths(self.root / point_dirname(index))

    def slurm(self, stage: str) -> Path:
        return self.root / "slurm" / stage

    @property
    def report(self) -> Path:
        return self.root / "report"
