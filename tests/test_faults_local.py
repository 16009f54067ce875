"""A rank-0 exception (or a NaN loss on rank 1) on the local backend (submitit's LocalExecutor, 2 CPU ranks over
gloo) ends both ranks and the launch, with the exception in the point's status; before the fix rank 0 waited in a
barrier and rank 1 in all_gather, forever. Real: TRL training of a tiny gpt-oss, gloo. The faults: the test-only
hooks GPTOSS_HPC_TEST_RAISE_AT and GPTOSS_HPC_TEST_NAN_AT. The timeout is a hang bound, not a speed check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.paths import RunPaths
from gptoss_hpc.stages.divergence import NAN_ENV
from gptoss_hpc.stages.train import FAULT_ENV

pytestmark = pytest.mark.slow


def _launch_two_ranks(tmp_path: Path, fault: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    """A 2-rank local launch of train -> merge -> eval with a test-only fault hook; (the launch, its run dir)."""
    run_root = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_TOKEN"))}
    args = [
        "experiment=demo", "cluster.gpus_per_node=2", "cluster.tasks_per_node=2", "model.tokenizer=tiny-bpe",
        "train.max_steps=100000", "train.save_steps=2", "train.max_length=256", "stages=[train,merge,eval]",
        f"run_root={run_root}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gptoss_hpc.launch", *args],
            capture_output=True, text=True, timeout=600, env={**env, **fault},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the launch hung after the injected fault {fault}: {exc.stderr}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (manifest,) = run_root.glob("*/*/launch.json")
    run_dir = manifest.parent
    logs = "".join(p.read_text() for p in (run_dir / "slurm" / "train").glob("*_log.err"))
    assert "distributed: world size 2" in logs  # rank 0's one line (modeling/distributed.py)
    assert list((run_dir / "slurm" / "train").glob("*_1_log.err"))  # rank 1 ran and wrote its own log
    point = RunPaths(run_dir).point(0)
    assert json.loads(point.stage_status("train").read_text())["state"] == "FAILED"
    assert not point.stage_status("merge").exists() and not point.stage_status("eval").exists()  # never started
    return proc, run_dir


def test_rank_0_exception_ends_both_local_ranks(tmp_path: Path) -> None:
    _, run_dir = _launch_two_ranks(tmp_path, {FAULT_ENV: "0:3"})
    record = json.loads(RunPaths(run_dir).point(0).stage_status("train").read_text())
    assert record["error"] == f"InjectedFault: test fault injected by {FAULT_ENV}=0:3 on rank 0 at step 3"


def test_a_nan_on_rank_1_of_2_ends_both_ranks_and_cancels_merge_and_eval(tmp_path: Path) -> None:
    """The NaN of GPTOSS_HPC_TEST_NAN_AT on rank 1 only: every rank sees it in the gathered loss and stops."""
    proc, run_dir = _launch_two_ranks(tmp_path, {NAN_ENV: "1:3"})
    point = RunPaths(run_dir).point(0)
    error = json.loads(point.stage_status("train").read_text())["error"]
    assert error.startswith("Diverged: loss became NaN at step 3 (learning rate "), error
    assert f"last good checkpoint: {point.train / 'checkpoint-2'}." in error
    assert "loss became NaN at step 3" in proc.stdout + proc.stderr  # the launch says why the point failed
    status = subprocess.run([sys.executable, "-m", "gptoss_hpc.status", str(run_dir)], capture_output=True, text=True)
    assert "loss became NaN at step 3" in status.stdout, status.stdout + status.stderr
