"""A rank-0 exception on the local backend (submitit's LocalExecutor, 2 CPU ranks over gloo) ends both ranks
and the launch, with the exception in the point's status; before the fix rank 0 waited in a barrier and rank 1
in all_gather, forever. Real: TRL training of a tiny gpt-oss, gloo. The fault: the test-only hook
GPTOSS_HPC_TEST_RAISE_AT. The timeout is a hang bound, not a speed check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.paths import RunPaths
from gptoss_hpc.stages.train_callbacks import FAULT_ENV

pytestmark = pytest.mark.slow


def test_rank_0_exception_ends_both_local_ranks(tmp_path: Path) -> None:
    run_root = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_TOKEN"))}
    args = [
        "experiment=demo", "cluster.gpus_per_node=2", "cluster.tasks_per_node=2", "model.tokenizer=tiny-bpe",
        "train.max_steps=100000", "train.save_steps=100000", "train.max_length=256", "stages=[train,merge]",
        f"run_root={run_root}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gptoss_hpc.launch", *args],
            capture_output=True, text=True, timeout=600, env={**env, FAULT_ENV: "0:3"},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the launch hung after the injected fault: {exc.stderr}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (manifest,) = run_root.glob("*/*/launch.json")
    point = RunPaths(manifest.parent).point(0)
    record = json.loads(point.stage_status("train").read_text())
    assert record["state"] == "FAILED"
    assert record["error"] == f"InjectedFault: test fault injected by {FAULT_ENV}=0:3 on rank 0 at step 3"
    logs = "".join(p.read_text() for p in (manifest.parent / "slurm" / "train").glob("*_log.err"))
    assert "distributed: world size 2" in logs  # rank 0's one line (modeling/distributed.py)
    assert list((manifest.parent / "slurm" / "train").glob("*_1_log.err"))  # rank 1 ran and wrote its own log
    assert not point.stage_status("merge").exists()  # merge never started on the failed point
