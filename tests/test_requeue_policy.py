"""Requeue counting and time-limit vs preemption, with a faked clock (as submitit tests its SignalHandler);
which id `scontrol requeue` gets; the sbatch lines the launcher writes for it (golden, 2 nodes, TERM).
No Slurm here: the real-cluster behaviour is in tests/test_multinode_slurm.py and test_train_requeue.py.

    .venv/bin/python -m pytest -q tests/test_requeue_policy.py
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, to_run_config, validate
from gptoss_hpc.errors import ConfigError
from gptoss_hpc.stages.requeue import (
    RequeuePolicy,
    preempt_signum,
    requeue_target,
    restart_count,
)
from gptoss_hpc.submission import backends, pipeline

GOLDEN = Path(__file__).parent / "golden"


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _cluster(*overrides: str):
    return validate(to_run_config(compose(["cluster=local_slurm", *overrides]))).cluster


def test_signal_long_before_the_time_limit_is_preemption_and_requeues():
    clock = FakeClock()
    policy = RequeuePolicy.for_cluster(_cluster("cluster.time=01:00:00", "cluster.signal_delay_s=300"), clock(), clock)
    clock.advance(10 * 60)
    decision = policy.decide(restarts=0)
    assert decision.requeue and decision.cause == "preemption"
    assert decision.describe(12, "/r/train/checkpoint-12").startswith(
        "preemption at step 12 (/r/train/checkpoint-12 saved): requeue 1 of 3"
    )


def test_signal_at_time_limit_minus_delay_is_the_time_limit():
    clock = FakeClock()
    policy = RequeuePolicy.for_cluster(_cluster("cluster.time=01:00:00", "cluster.signal_delay_s=300"), clock(), clock)
    clock.advance(3600 - 300 - 61)  # just before Slurm's 60 s signal slack
    assert policy.decide(0).cause == "preemption"
    clock.advance(2)
    assert policy.decide(0).cause == "time limit"
    clock.advance(300)
    assert policy.decide(0).cause == "time limit"


@pytest.mark.parametrize(("restarts", "requeue"), [(0, True), (1, True), (2, False), (5, False)])
def test_max_requeues_counts_every_restart(restarts: int, requeue: bool):
    clock = FakeClock()
    policy = RequeuePolicy.for_cluster(_cluster("cluster.max_requeues=2"), clock(), clock)
    clock.advance(30)
    decision = policy.decide(restarts)
    assert decision.requeue is requeue
    text = decision.describe(40, None)
    if requeue:
        assert f"requeue {restarts + 1} of 2" in text
    else:
        assert "not requeued, cluster.max_requeues=2 used up" in text and f"({restarts} requeues so far)" in text


def test_max_requeues_zero_never_requeues():
    clock = FakeClock()
    assert not RequeuePolicy.for_cluster(_cluster("cluster.max_requeues=0"), clock(), clock).decide(0).requeue


def test_restart_count_comes_from_slurm():
    assert restart_count({}) == 0
    assert restart_count({"SLURM_RESTART_COUNT": "2"}) == 2


def test_an_array_task_requeues_only_itself():
    env = {"SLURM_JOB_ID": "812", "SLURM_ARRAY_JOB_ID": "810", "SLURM_ARRAY_TASK_ID": "2"}
    assert requeue_target(env) == "810_2"  # the bare 810 would requeue every task of the array
    assert requeue_target({"SLURM_JOB_ID": "77"}) == "77"


def test_preempt_signal_is_usr2_by_default_term_supported_else_rejected():
    assert preempt_signum(_cluster()) == signal.SIGUSR2
    assert preempt_signum(_cluster("cluster.preempt_signal=TERM")) == signal.SIGTERM
    with pytest.raises(ConfigError, match=r"cluster\.preempt_signal must be one of USR2, TERM \(got 'KILL'\)"):
        _cluster("cluster.preempt_signal=KILL")


def _render(overrides: list[str], tmp_path: Path) -> dict[str, str]:
    run_dir = tmp_path / "logs" / "golden" / "20261125-000000"
    scripts = backends.render_scripts(pipeline.compose_launch(overrides), run_dir)
    text = {s: t.replace(str(run_dir), "<RUN_DIR>").replace(sys.executable, "<PYTHON>") for s, t in scripts}
    return {s: re.sub(r"'<PYTHON>'", "<PYTHON>", t) for s, t in text.items()}


def test_golden_sbatch_two_nodes_term(tmp_path: Path) -> None:
    overrides = ["cluster=coreweave_h200", "name=golden", "cluster.nodes=2", "cluster.preempt_signal=TERM"]
    scripts = _render(overrides, tmp_path)
    text = "\n".join(f"##### {stage}\n{script}" for stage, script in scripts.items())
    golden = GOLDEN / "coreweave_h200_multinode.sbatch"
    if os.environ.get("GPTOSS_HPC_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    train = scripts["train"].splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --requeue"} <= set(train)
    assert "#SBATCH --signal=TERM@300" in train
    assert "#SBATCH --nodes=1" in scripts["merge"].splitlines()  # merge/eval stay on one node


def test_no_requeue_when_max_requeues_is_zero_and_per_task_gpus(tmp_path: Path) -> None:
    overrides = ["cluster=coreweave_h200", "cluster.max_requeues=0", "cluster.gpus_per_task=1", "stages=[train]"]
    train = _render(overrides, tmp_path)["train"].splitlines()
    assert "#SBATCH --no-requeue" in train and "#SBATCH --requeue" not in train
    assert "#SBATCH --gpus-per-task=1" in train and not any(x.startswith("#SBATCH --gpus-per-node") for x in train)
