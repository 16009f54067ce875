"""Preemption on a real Slurm: USR2 → every rank checkpoints → rank 0 requeues the job → it resumes and
ends at the same global step as an uninterrupted run (TERM and 2 nodes: tests/test_multinode_slurm.py).

Real slurmctld/slurmd/slurmdbd from launchers/local_slurm.sh, submitit's SlurmExecutor and TrainJob as the
launcher submits them, 2 ranks with DeepSpeed ZeRO-2 over gloo; only the GPUs are absent (CPU ranks).
The signal is sent the way Slurm's `--signal=USR2@<s>` delivers it before the time limit: to every task of
the job's steps (`scancel --signal=USR2 <job>`); `scontrol requeue` from outside would not checkpoint.

    .venv/bin/python -m pytest -q tests/test_train_requeue.py
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.train import TrainJob

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

# Room for the signal to land mid-run: it is sent once step 5 is logged, ~1 s (a few steps) later at most.
MAX_STEPS = 40


def _logged_steps(paths: PointPaths) -> list[int]:
    if not paths.metrics.is_file():
        return []
    return [json.loads(x)["step"] for x in paths.metrics.read_text().splitlines() if '"loss"' in x]


def _sacct_attempts(job_id: str) -> list[str]:
    """States of every attempt of the job (-D: requeued attempts too), oldest first."""
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State"], check=True, capture_output=True, text=True
    )
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def test_usr2_checkpoints_requeues_and_resumes_to_the_same_final_step(tmp_path: Path, local_slurm: Path):
    cfg = validate(
        to_run_config(
            compose(
                [
                    "experiment=demo",
                    "model.tokenizer=tiny-bpe",
                    "train.deepspeed=true",
                    f"train.max_steps={MAX_STEPS}",
                    "train.save_steps=1000",  # only the preemption saves a checkpoint
                    "cluster.tasks_per_node=2",
                ]
            )
        )
    )
    config = save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml")
    paths = PointPaths.from_config(config)
    executor = submitit.AutoExecutor(folder=paths.run_dir / "slurm" / "train", cluster="slurm")
    executor.update_parameters(
        slurm_partition="debug", timeout_min=10, nodes=1, tasks_per_node=2, cpus_per_task=1, name="gptoss-requeue"
    )
    job = executor.submit(TrainJob(), str(config))

    deadline = time.monotonic() + 300
    while len(_logged_steps(paths)) < 5:
        if job.done() or time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} never got to step 5: {job.state}\n{job.stderr() or ''}"[-4000:])
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, capture_output=True, text=True)

    result = job.results()[0]  # rank 0's; waits through the requeue, raises if the job failed
    m = json.loads(paths.train_metrics.read_text())
    resumed = m["resumed_from"]
    assert resumed is not None, "the job finished without a requeue/resume"
    stopped_at = int(Path(resumed).name.split("-")[1])
    print(f"job {job.job_id}: USR2 → checkpoint-{stopped_at} → requeue → resumed → step {m['global_step']}")
    assert 5 <= stopped_at < MAX_STEPS
    assert result["global_step"] == m["global_step"] == MAX_STEPS  # what an uninterrupted run ends at
    assert m["world_size"] == 2 and m["engine"] == "DeepSpeedEngine" and m["zero_stage"] == 2
    steps = _logged_steps(paths)
    assert steps[-1] == MAX_STEPS and stopped_at + 1 in steps
    assert json.loads(paths.stage_status("train").read_text())["state"] == "COMPLETED"
    log = "\n".join(p.read_text(errors="ignore") for p in (paths.run_dir / "slurm" / "train").glob("*_0_log.*"))
    assert "caught SIGUSR2" in log and f"requeued Slurm job {job.job_id}" in log and "requeue 1 of 3" in log
    deadline = time.monotonic() + 30  # sacct lags a second or two
    while (attempts := _sacct_attempts(job.job_id))[-1:] != ["COMPLETED"] and time.monotonic() < deadline:
        time.sleep(1)
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", attempts
