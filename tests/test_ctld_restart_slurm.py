"""slurmctld restarted under a launch, on the REAL 2-node local Slurm (`local_slurm.sh restart-ctld --nodes 2`: the
controller stopped with SIGTERM, so it saves its state, and started again from it; the one-node cluster other
tests share is never touched).

- a launch submitted while the controller is down submits each job once (sbatch's transient error is retried,
  the tagged job looked up first: gptoss_hpc/submission/executor.py);
- restarted mid-sweep: the running point goes on in the same process and logs every step once, the pending point
  starts, `status`, `logs` and `cancel` work afterwards, and no job or task ran twice.

Real: slurmctld/slurmd/slurmdbd, the launcher's sbatch scripts, TRL training of a tiny gpt-oss on the CPU.
Faked: the GPUs (gres on character devices).

    .venv/bin/python -m pytest -q tests/test_ctld_restart_slurm.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from launch_cli import launch_run

from gptoss_hpc import slurm
from gptoss_hpc.bench.chaos import TINY
from gptoss_hpc.bench.chaos_faults import cluster, ctld_pid, job_pids, rank_pid, wait_until
from gptoss_hpc.monitor.run_files import read_metrics
from gptoss_hpc.paths import RunPaths

pytestmark = [pytest.mark.slurm2, pytest.mark.slow, pytest.mark.timeout(900)]

# two points, one at a time (array_parallelism=1): point 1 is PENDING (JobArrayTaskLimit) while point 0 trains
SWEEP = [
    *TINY,  # the chaos soak's tiny gpt-oss, one rank per point
    "train.max_steps=120",  # long enough that point 0 is still training across the restart on a loaded CI box
    "train.save_steps=1000",
    "cluster.array_parallelism=1",
    "stages=[train]",
    "name=ctld",
    "-m",
    "train.learning_rate=1e-3,2e-3",
]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def _states(tasks: list[str]) -> dict[str, str]:
    return {t: s.state for t, s in slurm.query([tasks[0].split("_")[0]], tasks=tasks).states.items() if t in tasks}


def test_controller_restart_mid_sweep_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 2))
    # 1. the launch meets a controller that is down for 8 s
    restart = threading.Thread(target=cluster, args=("restart-ctld", "8"))
    restart.start()
    assert wait_until(lambda: ctld_pid() is None, 30, every=0.1), "slurmctld did not go down"
    run_dir, manifest, _ = launch_run(SWEEP, tmp_path, timeout=300)
    restart.join()
    array = manifest.job("train").job_id
    tasks = [f"{array}_0", f"{array}_1"]
    p0, p1 = RunPaths(run_dir).point(0), RunPaths(run_dir).point(1)

    # 2. point 0 training, point 1 waiting: restart the controller
    assert wait_until(lambda: len(read_metrics(p0.metrics)[0]) >= 2, 400, every=1), _states(tasks)
    assert _states(tasks) == {tasks[0]: "RUNNING", tasks[1]: "PENDING"}
    rank0 = rank_pid(tasks[0])
    old = ctld_pid()
    cluster("restart-ctld")
    assert ctld_pid() != old

    # status and logs answer right after the restart, from the restarted controller
    shown = _cli("gptoss_hpc.status", str(run_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["job_id"]: r["state"] for r in json.loads(shown.stdout)["jobs"]}
    # point 1 waits while point 0 runs; if point 0 finished during the restart, point 1 may have started since
    assert rows[tasks[0]] in ("RUNNING", "COMPLETED"), rows
    assert rows[tasks[1]] == "PENDING" or (rows[tasks[0]] == "COMPLETED" and rows[tasks[1]] != "FAILED"), rows
    log = _cli("gptoss_hpc.logs", str(run_dir), "--point", "0", "--err")
    assert log.returncode == 0 and "LoRA:" in log.stdout, log.stderr

    # 3. the running point went on in the same process, the pending one starts
    assert rank0 is not None and rank_pid(tasks[0]) in (rank0, None)  # same process, or already done
    assert wait_until(lambda: _states(tasks).get(tasks[0]) == "COMPLETED", 400, every=2), _states(tasks)
    assert read_metrics(p0.metrics)[0] == list(range(1, 121)), "point 0 restarted or skipped steps"
    assert wait_until(lambda: len(read_metrics(p1.metrics)[0]) >= 1, 400, every=1), _states(tasks)

    # 4. cancel works on the restarted controller
    cancel = _cli("gptoss_hpc.cancel", str(run_dir))
    assert cancel.returncode == 0, cancel.stderr
    assert wait_until(lambda: _states(tasks).get(tasks[1]) == "CANCELLED", 60, every=1), _states(tasks)
    assert wait_until(lambda: not job_pids({array}), 30), job_pids({array})

    # 5. nothing submitted or run twice: one job of the launch's name since the test began (sacct -S also lists
    #    jobs of earlier tests that ended after it), each task one attempt
    runs = slurm.attempts([array])
    assert sorted(a.job_id for a in runs) == tasks, runs
    names = {a.name for a in runs}
    assert {a.job_id.split("_")[0] for a in slurm.attempts(since=since) if a.name in names} == {array}
    assert len(list((run_dir / "slurm" / "train").glob("*_submitted.pkl"))) == 2  # submitit's, once per task
