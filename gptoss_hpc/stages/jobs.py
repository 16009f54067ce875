"""The callables submitit pickles: a stage name and, at call time, a config path. Nothing else.

The pickle holds no config, no environment and no secrets, only a reference to this class and the stage
name; the job reads its point's config.yaml. The stage module is imported inside the job, so the launcher
never imports torch. The launcher hands ``stage_callable`` to the submission backend: submission never imports
the stages it submits.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptoss_hpc.submission.sbatch import STAGE_MODULES


class StageCall:
    """Runs `gptoss_hpc.stages.<stage>.main(target)`; target = a point's config.yaml (report: the run dir)."""

    def __init__(self, stage: str) -> None:
        if stage not in STAGE_MODULES:
            raise ValueError(f"unknown stage {stage!r}")
        self.stage = stage

    def __call__(self, target: str) -> Any:
        return importlib.import_module(STAGE_MODULES[self.stage]).main(target)

    def __repr__(self) -> str:
        return f"StageCall({self.stage!r})"


def stage_callable(stage: str) -> Any:
    """Train jobs use the checkpointable TrainJob (requeue + resume on preemption); the rest StageCall."""
    if stage == "train":
        from gptoss_hpc.stages.train import TrainJob

        return TrainJob()
    return StageCall(stage)
