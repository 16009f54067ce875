"""The train stage as the launcher submits it: a checkpointable job that requeues itself on the preempt signal."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import submitit

from gptoss_hpc.config import load_run_config
from gptoss_hpc.modeling.distributed import global_rank
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.common import write_status
from gptoss_hpc.stages.requeue import (
    RequeueLimitError,
    RequeuePolicy,
    preempt_signum,
    requeue,
    requeue_target,
    restart_count,
)
from gptoss_hpc.stages.train import STAGE, main
from gptoss_hpc.stages.train_callbacks import PREEMPT, Preempted

log = logging.getLogger(__name__)


class TrainJob(submitit.helpers.Checkpointable):
    """What the launcher submits (``executor.map_array(TrainJob(), config_paths)``).

    On ``cluster.preempt_signal`` (USR2 or TERM: the time-limit warning or preemption) every rank finishes its
    step and a checkpoint is saved (our handler + the trainer callback); then rank 0 requeues this job (an
    array task: only itself) while ``cluster.max_requeues`` allows, else the job fails saying so. The requeued
    job resumes from the checkpoint at the same global step.
    """

    clock: Callable[[], float] = time.time  # class default: a job pickled before this attribute existed

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def __call__(self, config_path: str) -> dict[str, Any]:
        started = self.clock()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        try:
            return main(config_path)
        except Preempted as exc:
            paths = PointPaths.from_config(config_path)
            if "SLURM_JOB_ID" not in os.environ and callable(submitit_handler):
                # submitit's local executor: its own handler checkpoints and restarts the tasks
                write_status(paths, STAGE, "REQUEUED", checkpoint=exc.checkpoint, step=exc.step)
                if global_rank() != 0:
                    time.sleep(120)  # rank 0 requeues the whole job, which ends this task
                    raise
                submitit_handler(signal.SIGUSR2, None)  # submitit: checkpoint() → requeue → sys.exit
                raise
            cluster = load_run_config(paths.config).cluster
            decision = RequeuePolicy.for_cluster(cluster, started, self.clock).decide(restart_count())
            message = decision.describe(exc.step, exc.checkpoint)
            rank0 = global_rank() == 0
            if not decision.requeue:
                if rank0:
                    write_status(paths, STAGE, "FAILED", error=message, checkpoint=exc.checkpoint, step=exc.step)
                raise RequeueLimitError(message) from exc
            if rank0:
                write_status(paths, STAGE, "REQUEUED", checkpoint=exc.checkpoint, step=exc.step, reason=message)
            log.warning("%s", message)
            if not rank0:
                time.sleep(120)  # rank 0 requeues the job, which ends this task
                raise
            # requeueing sends SIGTERM to every task: it must not start another checkpoint
            signal.signal(preempt_signum(cluster), signal.SIG_IGN)
            requeue(requeue_target())
            # SystemExit, not an exception: submitit then writes no result, and the requeued run writes it
            raise SystemExit(f"requeued: {message}") from exc

    def checkpoint(self, config_path: str) -> submitit.helpers.DelayedSubmission:
        PREEMPT.set()  # if the signal reached submitit's handler first, the running trainer still stops
        log.warning("requeueing %s: the next run resumes from the newest checkpoint", config_path)
        return submitit.helpers.DelayedSubmission(TrainJob(), config_path)
