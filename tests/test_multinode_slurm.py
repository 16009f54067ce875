"""Multi-node training, preemption and node loss on the REAL 2-node local Slurm
(`launchers/local_slurm.sh start --nodes 2`: node1 and node2 are slurmds in their own network/UTS/mount
namespaces, with their own hostnames and addresses on a private bridge).

Real: slurmctld/slurmd/slurmdbd, the launcher's own sbatch scripts (`python -m gptoss_hpc.launch`), srun,
TRL + PEFT + DeepSpeed ZeRO-2 over gloo on a tiny gpt-oss. Faked: the GPUs (gres on character devices;
ranks run on the CPU), and a node's death (every process in its namespace gets SIGKILL).

    .venv/bin/python -m pytest -q tests/test_multinode_slurm.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_cli import launch_run

from gptoss_hpc.paths import RunPaths
from gptoss_hpc.submission.manifest import Manifest

pytestmark = [pytest.mark.slurm2, pytest.mark.slow, pytest.mark.timeout(900)]

LOCAL_SLURM = Path(__file__).resolve().parents[1] / "launchers" / "local_slurm.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}
# tiny gpt-oss, the small BPE tokenizer, DeepSpeed ZeRO-2 over gloo, 2 ranks per node
BASE = [
    "experiment=demo",
    "cluster=local_slurm",
    "model.tokenizer=tiny-bpe",
    "train.deepspeed=true",
    "train.max_length=256",
    "train.logging_steps=1",
]
# what a submitting shell that was itself a torchrun worker would leak into every task (--export=ALL)
LEAKED = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


def _launch(args: list[str], run_root: Path, env: dict[str, str] | None = None) -> tuple[Path, Manifest]:
    run_dir, manifest, _ = launch_run([*BASE, *args], run_root, {**os.environ, **(env or {})})
    return run_dir, manifest


def _sacct(job_id: str, *flags: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", *flags, "-j", job_id, "-o", "JobID,State,NodeList"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(j, s.split()[0] if s else "", n) for j, s, n in (line.split("|") for line in out.splitlines())]


def _wait_terminal(job_ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {j: s for jid in job_ids for j, s, _ in _sacct(jid)}
        if all(states.get(j) in TERMINAL for j in job_ids):
            return states
        time.sleep(2)
    subprocess.run(["scancel", *job_ids], check=False)
    pytest.fail(f"jobs {job_ids} not finished after {timeout} s: {states}")


def _steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]


def _wait_step(metrics: Path, job_id: str, step: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while len(_steps(metrics)) < step:
        states = {s for _, s, _ in _sacct(job_id)}
        if states & TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} never logged step {step}: sacct {states}")
        time.sleep(0.5)


def _losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _status_json(run_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.status", str(run_dir), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_two_nodes_by_two_ranks_train_like_one_node_by_four(tmp_path: Path, local_slurm_2node: Path) -> None:
    steps = ["train.max_steps=4", "stages=[train]"]
    # 2 nodes x 2 ranks, submitted from a shell that leaks RANK=0 WORLD_SIZE=1 MASTER_ADDR=localhost
    two_dir, two = _launch(["cluster.nodes=2", *steps, "name=n2x2"], tmp_path / "a", LEAKED)
    one_dir, one = _launch(["cluster.nodes=1", "cluster.gpus_per_node=4", *steps, "name=n1x4"], tmp_path / "b")
    two_id, one_id = two.job("train").job_id, one.job("train").job_id
    script = (two_dir / "slurm" / "train" / f"{two_id}_submission.sh").read_text().splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2"} <= set(script)
    assert _wait_terminal([two_id, one_id], timeout=600) == {two_id: "COMPLETED", one_id: "COMPLETED"}

    m2 = json.loads(RunPaths(two_dir).point(0).train_metrics.read_text())
    m1 = json.loads(RunPaths(one_dir).point(0).train_metrics.read_text())
    ((_, _, nodelist),) = _sacct(two_id)
    assert nodelist == "node[1-2]"
    assert m2["world_size"] == m2["distributed_world_size"] == 4 and m2["rank_source"] == "submitit"
    assert m2["hosts"] == ["node1", "node1", "node2", "node2"]  # ranks by host: 2 distinct hosts
    assert m2["master_addr"] == "node1"  # the allocation's first node, not the leaked localhost
    assert (m2["engine"], m2["zero_stage"], m2["backend"]) == ("DeepSpeedEngine", 2, "gloo")
    assert m1["world_size"] == 4 and len(set(m1["hosts"])) == 1
    status = json.loads(RunPaths(two_dir).point(0).stage_status("train").read_text())
    assert (status["state"], status["host"]) == ("COMPLETED", "node1")  # written by rank 0 only
    # same data, same global batch, same seed: the same losses whichever way the 4 ranks are placed
    l2, l1 = _losses(RunPaths(two_dir).point(0).metrics), _losses(RunPaths(one_dir).point(0).metrics)
    assert sorted(l2) == sorted(l1) == [1, 2, 3, 4]
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
    log0 = (two_dir / "slurm" / "train" / f"{two_id}_0_log.err").read_text()
    assert "distributed: world size 4 on 2 node(s), master node1:" in log0 and "backend gloo" in log0
    assert "ignoring inherited" in log0


def _wait_requeued_and_running(job_id: str, attempts: int, metrics: Path, step: int, timeout: float = 400) -> None:
    """Until sacct lists `attempts` REQUEUED attempts and the newest run has logged `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [s for _, s, _ in _sacct(job_id, "-D")]
        if states.count("REQUEUED") >= attempts and len(_steps(metrics)) >= step:
            return
        if states and states[-1] in TERMINAL:
            pytest.fail(f"job {job_id} ended before reaching step {step} again: {states}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not requeued {attempts}x and back at step {step} after {timeout} s")


def test_term_preemption_and_external_requeue_of_a_two_node_job_resume_at_the_same_step(
    tmp_path: Path, local_slurm_2node: Path
) -> None:
    max_steps = 30
    run_dir, manifest = _launch(
        [
            "cluster.nodes=2",
            "cluster.preempt_signal=TERM",
            f"train.max_steps={max_steps}",
            "train.save_steps=1000",  # only the preemptions save checkpoints
            "stages=[train]",
            "name=term",
        ],
        tmp_path,
    )
    job_id = manifest.job("train").job_id
    point = RunPaths(run_dir).point(0)
    script = (run_dir / "slurm" / "train" / f"{job_id}_submission.sh").read_text().splitlines()
    assert "#SBATCH --signal=TERM@60" in script and "#SBATCH --requeue" in script  # what the launcher writes
    _wait_step(point.metrics, job_id, 3)
    # 1. what Slurm does at --signal=TERM@60, or on preemption: TERM to every task of the job's steps; the
    #    ranks checkpoint and rank 0 requeues the job
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, capture_output=True, text=True)
    _wait_requeued_and_running(job_id, 1, point.metrics, len(_steps(point.metrics)) + 3)
    # 2. `scontrol requeue` from outside (an admin, or preemption with PreemptMode=REQUEUE): Slurm sends
    #    TERM to every task and requeues the job itself; the ranks checkpoint within KillWait
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)

    assert _wait_terminal([job_id], timeout=600) == {job_id: "COMPLETED"}
    m = json.loads(point.train_metrics.read_text())
    assert m["resumed_from"] is not None, "finished without a resume"
    stopped_at = int(Path(m["resumed_from"]).name.split("-")[1])
    assert 6 <= stopped_at < max_steps and m["global_step"] == max_steps and m["world_size"] == 4
    # resumed at the same global step both times: every step logged once, none lost, none repeated
    assert _steps(point.metrics) == list(range(1, max_steps + 1))
    attempts = [s for _, s, _ in _sacct(job_id, "-D")]
    assert attempts == ["REQUEUED", "REQUEUED", "COMPLETED"], attempts
    log = (run_dir / "slurm" / "train" / f"{job_id}_0_log.err").read_text()
    assert "caught SIGTERM" in log and f"requeued Slurm job {job_id}" in log
    assert "requeue 1 of 3" in log and "requeue 2 of 3" in log  # SLURM_RESTART_COUNT counts both


def test_a_preempted_array_task_requeues_only_itself(tmp_path: Path, local_slurm_2node: Path) -> None:
    max_steps = 20
    run_dir, manifest = _launch(
        [
            "-m",
            "cluster.preempt_signal=TERM",
            "cluster.gpus_per_node=1",
            "train.deepspeed=false",
            f"train.max_steps={max_steps}",
            "train.save_steps=1000",
            "train.learning_rate=1e-3,2e-3",
            "stages=[train]",
            "name=arraytask",
        ],
        tmp_path,
    )
    array_id = manifest.job("train").job_id
    task0, task1 = f"{array_id}_0", f"{array_id}_1"
    point1 = RunPaths(run_dir).point(1)
    _wait_step(point1.metrics, task1, 3)
    subprocess.run(["scancel", "--signal=TERM", task1], check=True, capture_output=True, text=True)

    assert _wait_terminal([task0, task1], timeout=400) == {task0: "COMPLETED", task1: "COMPLETED"}
    attempts = {}
    for jid, state, _ in _sacct(array_id, "-D"):
        attempts.setdefault(jid, []).append(state)
    assert attempts == {task0: ["COMPLETED"], task1: ["REQUEUED", "COMPLETED"]}, attempts
    assert _steps(point1.metrics) == list(range(1, max_steps + 1))
    log = (run_dir / "slurm" / "train" / f"{task1}_0_log.err").read_text()
    assert f"requeued Slurm job {task1}" in log


def test_requeues_used_up_fail_the_job_with_a_status_line(tmp_path: Path, local_slurm_2node: Path) -> None:
    run_dir, manifest = _launch(
        [
            "cluster.preempt_signal=TERM",
            "cluster.max_requeues=0",
            "cluster.gpus_per_node=1",
            "train.deepspeed=false",
            "train.max_steps=2000",
            "stages=[train]",
            "name=norequeue",
        ],
        tmp_path,
    )
    job_id = manifest.job("train").job_id
    point = RunPaths(run_dir).point(0)
    assert "#SBATCH --no-requeue" in (run_dir / "slurm" / "train" / f"{job_id}_submission.sh").read_text()
    _wait_step(point.metrics, job_id, 2)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, capture_output=True, text=True)
    assert _wait_terminal([job_id], timeout=300) == {job_id: "FAILED"}
    status = json.loads(point.stage_status("train").read_text())
    assert status["state"] == "FAILED"
    assert "not requeued, cluster.max_requeues=0 used up" in status["error"], status
    (row,) = _status_json(run_dir)["jobs"]
    assert row["state"] == "FAILED" and "cluster.max_requeues=0 used up" in row["error"]


def test_losing_a_node_ends_the_job_in_bounded_time_and_status_names_it(
    tmp_path: Path, local_slurm_2node: Path
) -> None:
    run_dir, manifest = _launch(
        [
            "cluster.nodes=2",
            "cluster.max_requeues=0",  # --no-requeue: NODE_FAIL, not a requeue that waits for node2
            "train.max_steps=5000",
            "stages=[train,merge]",
            "name=nodeloss",
        ],
        tmp_path,
    )
    train_id, merge_id = manifest.job("train").job_id, manifest.job("merge").job_id
    _wait_step(RunPaths(run_dir).point(0).metrics, train_id, 2)
    killed = time.monotonic()
    try:
        subprocess.run(
            ["bash", str(LOCAL_SLURM), "kill-node", "2", "--nodes", "2"], check=True, capture_output=True, text=True
        )
        states = _wait_terminal([train_id, merge_id], timeout=180)
        took = time.monotonic() - killed
        print(f"node2 killed: train {states[train_id]} after {took:.0f} s, merge {states[merge_id]}")
        assert states[train_id] in ("NODE_FAIL", "FAILED") and states[merge_id] == "CANCELLED", states
        rows = {r["stage"]: r for r in _status_json(run_dir)["jobs"]}
        if states[train_id] == "NODE_FAIL":
            assert rows["train"]["error"].startswith("node failure: node2: Not responding"), rows["train"]
    finally:
        subprocess.run(
            ["bash", str(LOCAL_SLURM), "revive-node", "2", "--nodes", "2"], check=True, capture_output=True, text=True
        )
