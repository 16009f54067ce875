"""The real local Slurm (launchers/local_slurm.sh) does what the pipeline relies on.

Real slurmctld/slurmd/slurmdbd; only the GPUs are fake (character devices in gres.conf).
Submitted callables are stdlib functions (operator.add, os.getenv, math.sqrt) so the job side can
unpickle them without importing this test module.

    .venv/bin/python -m pytest -q tests/test_local_slurm.py
"""

from __future__ import annotations

import math
import operator
import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

PARTITION = "debug"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def _executor(folder: Path, **params: object) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=PARTITION, timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1, **params
    )
    return executor


def _sacct_states(job_id: str) -> dict[str, str]:
    """{"<id>" or "<array>_<task>": first word of State} from sacct (slurmdbd), allocations only."""
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"],
        check=True,
        capture_output=True,
        text=True,
    )
    states = {}
    for line in proc.stdout.splitlines():
        jid, _, state = line.partition("|")
        states[jid] = state.split()[0] if state else ""
    return states


def _wait_sacct(job_id: str, expected_ids: set[str], timeout_s: float = 90) -> dict[str, str]:
    """Poll sacct until every id in expected_ids has a terminal state (sacct lags a little)."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = _sacct_states(job_id)
        if expected_ids <= states.keys() and all(states[j] in TERMINAL for j in expected_ids):
            return states
        time.sleep(1)
    pytest.fail(f"sacct -j {job_id}: {states} after {timeout_s} s (expected final states for {expected_ids})")


def test_cluster_advertises_debug_partition_with_8_gpus(local_slurm: Path) -> None:
    assert os.environ["SLURM_CONF"] == str(local_slurm)
    out = subprocess.run(
        ["sinfo", "-h", "-p", PARTITION, "-o", "%P|%a|%c|%G|%l"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [f"{PARTITION}*|up|8|gpu:8|infinite"]


def test_submitted_function_completes_and_sacct_says_completed(tmp_path: Path) -> None:
    job = _executor(tmp_path).submit(operator.add, 2, 3)
    assert job.result() == 5
    assert _wait_sacct(job.job_id, {job.job_id}) == {job.job_id: "COMPLETED"}


def test_gpus_per_node_sets_cuda_visible_devices(tmp_path: Path) -> None:
    job = _executor(tmp_path, gpus_per_node=2).submit(os.getenv, "CUDA_VISIBLE_DEVICES")
    assert job.result() == "0,1"


def test_map_array_is_one_array_job(tmp_path: Path) -> None:
    jobs = _executor(tmp_path, slurm_array_parallelism=3).map_array(operator.mul, [1, 2, 3], [10, 10, 10])
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]
    (array_id,) = array_ids
    assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(3)]
    assert [job.result() for job in jobs] == [10, 20, 30]
    expected = {f"{array_id}_{i}" for i in range(3)}
    assert _wait_sacct(array_id, expected) == dict.fromkeys(expected, "COMPLETED")
    # one sbatch script with one --array line, as submitted
    scripts = list(tmp_path.glob("*_submission.sh"))
    assert len(scripts) == 1, scripts
    assert "#SBATCH --array=0-2%3" in scripts[0].read_text().splitlines()


def test_aftercorr_on_failed_task_is_cancelled_not_pending(tmp_path: Path) -> None:
    # upstream array: task 0 succeeds, task 1 raises (math domain error)
    upstream = _executor(tmp_path / "up").map_array(math.sqrt, [4.0, -1.0])
    up_id = upstream[0].job_id.split("_")[0]
    downstream = _executor(
        tmp_path / "down",
        slurm_additional_parameters={"dependency": f"aftercorr:{up_id}", "kill_on_invalid_dep": "yes"},
    ).map_array(math.sqrt, [9.0, 16.0])
    down_id = downstream[0].job_id.split("_")[0]

    assert _wait_sacct(up_id, {f"{up_id}_0", f"{up_id}_1"}) == {
        f"{up_id}_0": "COMPLETED",
        f"{up_id}_1": "FAILED",
    }
    with pytest.raises(submitit.core.utils.FailedJobError, match="math domain error"):
        upstream[1].result()
    # the task whose counterpart succeeded runs; the other is CANCELLED, not PENDING forever
    assert downstream[0].result() == 3.0
    assert _wait_sacct(down_id, {f"{down_id}_0", f"{down_id}_1"}) == {
        f"{down_id}_0": "COMPLETED",
        f"{down_id}_1": "CANCELLED",
    }
