"""sbatch retried on transient controller errors, adopting a job the failed call did create.

The Slurm test uses the REAL local Slurm (launchers/local_slurm.sh) behind a FAKE flaky sbatch: a shim on
PATH that runs the real sbatch and then reports "Socket timed out" (the job exists, the reply was lost),
or fails before calling it (no job was created).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.errors import SubmissionError
from gptoss_hpc.submission.executor import sbatch_with_retry
from gptoss_hpc.submission.manifest import Manifest

SOCKET = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"


def _counter_cmd(tmp_path: Path, script: str) -> list[str]:
    """A command that knows how often it ran ($N, 1-based): the n-th call's behaviour is scripted."""
    count = tmp_path / "n"
    return ["sh", "-c", f'echo x >> "{count}"; N=$(wc -l < "{count}"); {script}']


def test_transient_failure_without_a_job_is_retried_with_backoff(tmp_path: Path) -> None:
    waits: list[float] = []
    looked: list[str] = []
    cmd = _counter_cmd(
        tmp_path, f'if [ "$N" -le 2 ]; then echo "{SOCKET}" >&2; exit 1; fi; echo "Submitted batch job 77"'
    )
    job_id = sbatch_with_retry(cmd, tag="t", job_name="j", retries=3, delay_s=0.5,
                               lookup=lambda tag, name: looked.append(tag) or [], sleep=waits.append)  # fmt: skip
    assert job_id == "77"
    assert waits == [0.5, 1.0]  # exponential backoff
    assert looked == ["t", "t"]  # looked up before each new sbatch


def test_a_job_created_by_the_failed_call_is_adopted_not_resubmitted(tmp_path: Path) -> None:
    cmd = _counter_cmd(tmp_path, f'echo "{SOCKET}" >&2; exit 1')
    job_id = sbatch_with_retry(cmd, tag="t", job_name="j", retries=3, delay_s=0, lookup=lambda t, n: ["55"],
                               sleep=lambda s: None)  # fmt: skip
    assert job_id == "55"
    assert (tmp_path / "n").read_text().count("x") == 1


def test_a_failed_lookup_never_submits_blind(tmp_path: Path) -> None:
    def lookup(tag: str, name: str) -> list[str]:
        raise subprocess.CalledProcessError(1, ["squeue"], stderr="Socket timed out")

    cmd = _counter_cmd(tmp_path, f'echo "{SOCKET}" >&2; exit 1')
    with pytest.raises(SubmissionError, match="could not look the job up"):
        sbatch_with_retry(cmd, tag="t", job_name="j", retries=2, delay_s=0, lookup=lookup, sleep=lambda s: None)
    assert (tmp_path / "n").read_text().count("x") == 1


def test_a_permanent_error_is_not_retried(tmp_path: Path) -> None:
    cmd = _counter_cmd(tmp_path, 'echo "sbatch: error: invalid partition specified: x" >&2; exit 1')
    with pytest.raises(SubmissionError, match="invalid partition"):
        sbatch_with_retry(cmd, tag="t", job_name="j", retries=3, delay_s=0, lookup=lambda t, n: [],
                          sleep=lambda s: None)  # fmt: skip
    assert (tmp_path / "n").read_text().count("x") == 1


def test_retries_run_out_with_the_fix(tmp_path: Path) -> None:
    cmd = _counter_cmd(tmp_path, f'echo "{SOCKET}" >&2; exit 1')
    with pytest.raises(SubmissionError, match=r"cluster\.sbatch_retries"):
        sbatch_with_retry(cmd, tag="t", job_name="j", retries=2, delay_s=0, lookup=lambda t, n: [],
                          sleep=lambda s: None)  # fmt: skip
    assert (tmp_path / "n").read_text().count("x") == 3


def _squeue_by_comment(prefix: str) -> dict[str, list[str]]:
    out = subprocess.run(["squeue", "--me", "--noheader", "--states=all", "--Format=ArrayJobID:|,Comment:"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    by_tag: dict[str, list[str]] = {}
    for line in out.splitlines():
        job_id, _, comment = (x.strip() for x in line.partition("|"))
        if comment.startswith(prefix) and job_id not in by_tag.get(comment, []):
            by_tag.setdefault(comment, []).append(job_id)
    return by_tag


@pytest.mark.slurm
def test_flaky_sbatch_ends_with_exactly_one_job_per_stage(tmp_path: Path) -> None:
    real = shutil.which("sbatch")
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    count = tmp_path / "calls"
    # Calls 1, 3, 4: the job is created, then the reply is lost. Call 2: lost before reaching the controller.
    # Call 5 (report) succeeds.
    (shim_dir / "sbatch").write_text(
        f'#!/bin/sh\necho x >> "{count}"\nN=$(wc -l < "{count}")\n'
        f'if [ "$N" -eq 2 ]; then echo "{SOCKET}" >&2; exit 1; fi\n'
        f'OUT=$("{real}" "$@") || exit $?\n'
        f'if [ "$N" -ne 5 ]; then echo "{SOCKET}" >&2; exit 1; fi\necho "$OUT"\n'
    )
    (shim_dir / "sbatch").chmod(0o755)
    run_root = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", "-m", "experiment=demo", "cluster=local_slurm", "name=flaky",
         "lora.r=4,8", "+cluster.sbatch_extra.hold=", "cluster.sbatch_retry_delay_s=0.2", f"run_root={run_root}"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    (run_dir,) = run_root.glob("flaky/*")
    manifest = Manifest.load(run_dir)
    jobs = {j.stage: j.job_id for j in manifest.jobs}
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "adopted job" in proc.stderr
        by_tag = _squeue_by_comment(f"gptoss_hpc:{manifest.launch_id}:")
        assert by_tag == {
            f"gptoss_hpc:{manifest.launch_id}:{s}": [jobs[s]] for s in ("train", "merge", "eval", "report")
        }
        assert count.read_text().count("x") == 5  # 4 stages + one resubmission after the call that created nothing
    finally:
        ids = [j for tag_ids in _squeue_by_comment(f"gptoss_hpc:{manifest.launch_id}:").values() for j in tag_ids]
        if ids:
            subprocess.run(["scancel", *ids], check=False)


def test_total_backoff_must_stay_under_submitits_pickle_wait() -> None:
    from gptoss_hpc.errors import ConfigError
    from gptoss_hpc.submission import pipeline

    pipeline.compose_launch(["cluster=coreweave_h200"])  # the defaults (3 x 5 s = 35 s) pass
    with pytest.raises(ConfigError, match=r"cluster\.sbatch_retries=5 .* waits up to 155 s"):
        pipeline.compose_launch(["cluster=coreweave_h200", "cluster.sbatch_retries=5"])
