"""The train stage's callbacks and signals: metrics.jsonl, the preemption stop, the test-only fault hook.

``PREEMPT`` is set by the preempt-signal handler (``on_preempt``, or TrainJob.checkpoint) and read at each step end by
the preemption callback, which makes every rank agree, save a checkpoint and stop. ``GPTOSS_HPC_TEST_RAISE_AT``
(``FAULT_ENV``) is the test-only fault hook: ``<rank>:<step>[:<point>]``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.distributed import any_rank, global_rank
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.divergence import rank_step

log = logging.getLogger(__name__)

# Test-only: "<rank>:<step>" makes that rank raise InjectedFault after that step (tests/test_faults_slurm.py).
FAULT_ENV = "GPTOSS_HPC_TEST_RAISE_AT"
# Set by the preempt-signal handler (or TrainJob.checkpoint); read by the trainer callback at each step end.
PREEMPT = threading.Event()


class InjectedFault(GptossHpcError):
    """Raised only when GPTOSS_HPC_TEST_RAISE_AT asks for it: a real user never sets that variable."""


class Preempted(GptossHpcError):
    """Training stopped on the preempt signal after saving a checkpoint; re-running the job resumes from it."""

    def __init__(self, checkpoint: str | None, step: int) -> None:
        self.checkpoint, self.step = checkpoint, step
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint} saved; re-run the same command to resume")


def metrics_and_preemption(paths: PointPaths, world_size: int) -> tuple[Any, Any]:
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """One JSON line per logging step in metrics.jsonl (rank 0)."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                self.losses.append(float(logs["loss"]))
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with paths.metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    class PreemptionCallback(TrainerCallback):
        """On the preempt signal (any rank): all ranks agree at a step end, save a checkpoint and stop."""

        def __init__(self) -> None:
            self.triggered = False

        def on_step_end(self, args, state, control, **kwargs):
            flag = PREEMPT.is_set()
            if world_size > 1:
                flag = any_rank(flag)
            if flag:
                log.warning("preemption signal: saving checkpoint-%d and stopping", state.global_step)
                self.triggered = True
                control.should_save = True
                control.should_training_stop = True
            return control

    return MetricsCallback(), PreemptionCallback()


def fault_callback(point: str) -> Any:
    """The test-only fault hook (None unless GPTOSS_HPC_TEST_RAISE_AT is set for this point)."""
    at = rank_step(FAULT_ENV, point)
    if at is None:
        return None
    from transformers import TrainerCallback

    rank, step = at
    spec = f"{rank}:{step}"

    class FaultCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if global_rank() == rank and state.global_step == step:
                raise InjectedFault(f"test fault injected by {FAULT_ENV}={spec} on rank {rank} at step {step}")

    log.warning("%s=%s is set: rank %d will raise at step %d (test-only fault hook)", FAULT_ENV, spec, rank, step)
    return FaultCallback()


def on_preempt(signum, frame) -> None:
    log.warning("caught %s: will checkpoint at the end of this step", signal.Signals(signum).name)
    PREEMPT.set()
