"""Preemption and time limits for train jobs: which signal means "checkpoint now", whether a job may requeue
itself once more, and which Slurm id to requeue. Pure functions plus one `scontrol requeue`.

Slurm sends `cluster.preempt_signal` (sbatch `--signal=<sig>@<signal_delay_s>`) before the time limit, and
preemption sends it too (SIGTERM everywhere; USR2 only where the site sets PreemptParameters=
send_user_signal). Either way every rank checkpoints at the end of its step; then rank 0 requeues the job,
or, when `cluster.max_requeues` requeues are used up (Slurm's own count, SLURM_RESTART_COUNT, so external
and node-failure requeues count too), the job fails with a status line that says so.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import ClusterConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.slurm import requeue as requeue  # `scontrol requeue`, run where every Slurm command runs

log = logging.getLogger(__name__)

SIGNALS = {"USR2": signal.SIGUSR2, "TERM": signal.SIGTERM}
# Slurm's --signal timer has a resolution of 60 s: the signal may come up to a minute early.
SIGNAL_SLACK_S = 60


class RequeueLimitError(GptossHpcError):
    """Preempted (or at the time limit) with no requeue left: the job fails, its checkpoint stays."""


def preempt_signum(cluster: ClusterConfig) -> int:
    return SIGNALS[cluster.preempt_signal]


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; absent on the first run)."""
    value = (os.environ if env is None else env).get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def requeue_target(env: Mapping[str, str] | None = None) -> str:
    """The id `scontrol requeue` must get: `<array>_<task>` for an array task (requeues that task alone;
    the bare array id would requeue every task of the array), else the job id."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not env.get("SLURM_JOB_ID"):
        raise GptossHpcError("not a Slurm job (no SLURM_JOB_ID): nothing to requeue")
    return env["SLURM_JOB_ID"]


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    cause: str  # "time limit" | "preemption"
    restarts: int  # requeues before this one
    max_requeues: int

    def describe(self, step: int, checkpoint: str | None) -> str:
        saved = f"{checkpoint} saved" if checkpoint else "no checkpoint saved"
        if self.requeue:
            return (
                f"{self.cause} at step {step} ({saved}): requeue {self.restarts + 1} of {self.max_requeues}, "
                "the next run resumes there"
            )
        return (
            f"{self.cause} at step {step} ({saved}): not requeued, cluster.max_requeues={self.max_requeues} "
            f"used up ({self.restarts} requeues so far); raise cluster.max_requeues, or resume by hand with "
            "`python -m gptoss_hpc.stages.train <point>/config.yaml`"
        )


@dataclass
class RequeuePolicy:
    """Counts requeues against `max_requeues` and tells the time limit from preemption, by the clock: a
    signal at or after `time limit - signal_delay_s - 60 s` of this run is the time limit's warning."""

    max_requeues: int
    time_limit_s: float | None
    signal_delay_s: int
    started: float
    clock: Callable[[], float] = time.time

    @classmethod
    def for_cluster(cls, cluster: ClusterConfig, started: float, clock: Callable[[], float] = time.time):
        minutes = derive.slurm_time_minutes(cluster.time)
        return cls(cluster.max_requeues, minutes * 60 if minutes else None, cluster.signal_delay_s, started, clock)

    def timed_out(self) -> bool:
        if self.time_limit_s is None:
            return False
        return self.clock() - self.started >= self.time_limit_s - self.signal_delay_s - SIGNAL_SLACK_S

    def decide(self, restarts: int) -> RequeueDecision:
        cause = "time limit" if self.timed_out() else "preemption"
        return RequeueDecision(restarts < self.max_requeues, cause, restarts, self.max_requeues)
