"""The whole pipeline on the REAL local Slurm (launchers/local_slurm.sh): sweep = one train array, merge and
eval arrays chained with aftercorr, a report after eval; a failing point stops only its own dependents;
secrets reach the jobs and never land in a file.

Real: slurmctld/slurmd/slurmdbd, sbatch via submitit, TRL/PEFT training of a tiny gpt-oss on CPU.
Faked: the GPUs (gres on /dev/null-like devices; ranks run on the CPU), W&B online (WANDB_MODE=offline),
the Hub (PUSH_TO_HUB=false, so the canary HF_TOKEN is never sent anywhere).
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
from gptoss_hpc.submission.slurm import expand_task_ids

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}
CANARIES = {
    "HF_TOKEN": "canary_hf_token_do_not_leak_0123456789",  # not hf_-shaped: no scanner mistakes it
    "WANDB_API_KEY": "0123456789abcdefcanarywandbkey0123456789",
    "HF_USER": "canary-user-gptoss",
}
# Small and fast: tiny gpt-oss, the small BPE tokenizer, 3 optimizer steps, one rank per job.
FAST = [
    "experiment=demo",
    "cluster=local_slurm",
    "cluster.gpus_per_node=1",
    "model.tokenizer=tiny-bpe",
    "train.max_steps=3",
    "train.max_length=256",
    "eval.max_new_tokens=8",
    "eval.max_eval_rows=4",
]


def _launch(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> tuple[Path, Manifest, str]:
    return launch_run(args, tmp_path / "logs", {**os.environ, **(env or {})})


def _sacct(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """sacct -X states by job/array-task id. Array tasks that never started (e.g. cancelled for a failed
    dependency) may be listed only under the array's range record, `637_[0-1%2]`: expand it."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "--format=JobID,State,JobName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows: dict[str, tuple[str, str]] = {}
    ranges = []
    for line in out.splitlines():
        job_id, state, name = line.split("|")
        if "_[" in job_id:
            ranges.append((job_id, state.split()[0], name))
        else:
            rows[job_id] = (state.split()[0], name)
    for job_id, state, name in ranges:
        for task in expand_task_ids(job_id):
            rows.setdefault(task, (state, name))
    return rows


def _wait_all(manifest: Manifest, timeout: float = 900) -> dict[str, str]:
    expected = [t for j in manifest.jobs for t in j.task_ids()]
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = {k: v[0] for k, v in _sacct([j.job_id for j in manifest.jobs]).items()}
        if all(states.get(t) in TERMINAL for t in expected):
            return states
        time.sleep(3)
    subprocess.run(["scancel", *[j.job_id for j in manifest.jobs]], check=False)
    pytest.fail(f"jobs not finished after {timeout} s: {states}")


def _dependency(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], check=True, capture_output=True, text=True).stdout
    return next(tok for tok in out.split() if tok.startswith("Dependency="))


def test_four_point_sweep_is_one_array_per_stage_and_completes_without_leaking_secrets(tmp_path: Path) -> None:
    env = {**CANARIES, "WANDB_MODE": "offline", "PUSH_TO_HUB": "false"}
    # a sweep over lengths: at 192 tokens the sample's longer rows are dropped, as asked
    fast = [a for a in FAST if not a.startswith("train.max_length=")]
    run_dir, manifest, stdout = _launch(
        ["-m", *fast, "name=sweep4", "lora.r=4,8", "train.max_length=192,256", "data.max_length_policy=drop"],
        tmp_path,
        env,
    )
    jobs = {j.stage: j for j in manifest.jobs}
    assert list(jobs) == ["train", "merge", "eval", "report"]
    assert [jobs[s].array for s in jobs] == [True, True, True, False]
    assert all(jobs[s].points == [0, 1, 2, 3] for s in ("train", "merge", "eval"))
    # Dependencies as Slurm holds them, read right after submission.
    assert _dependency(jobs["merge"].job_id + "_0").startswith(f"Dependency=aftercorr:{jobs['train'].job_id}_")
    assert _dependency(jobs["eval"].job_id + "_0").startswith(f"Dependency=aftercorr:{jobs['merge'].job_id}_")
    assert _dependency(jobs["report"].job_id).startswith(f"Dependency=afterany:{jobs['eval'].job_id}_")
    assert jobs["train"].job_id in stdout and "squeue" in stdout

    states = _wait_all(manifest)
    assert {t: states[t] for j in manifest.jobs for t in j.task_ids()} == {
        t: "COMPLETED" for j in manifest.jobs for t in j.task_ids()
    }
    names = _sacct([jobs["train"].job_id])
    assert sorted(names) == [f"{jobs['train'].job_id}_{i}" for i in range(4)], "one train array of 4 tasks"
    assert {n for _, n in names.values()} == {"gptoss-sweep4-train"}

    paths = RunPaths(run_dir)
    for i in range(4):
        point = paths.point(i)
        assert (point.adapter / "adapter_config.json").is_file()
        assert any(point.merged.glob("*.safetensors"))
        evaluation = json.loads((point.eval / "eval.json").read_text())
        assert evaluation, f"empty eval.json for point {i}"
    report = json.loads((paths.report / "report.json").read_text())
    assert len(report["points"]) == 4
    assert all(p["state"] == "ok" for p in report["points"])
    assert all((paths.report / png).is_file() for png in ("loss_curves.png", "eval_vs_lora_r.png"))
    _merged_equals_base_plus_adapter(paths.point(3))
    _each_point_says_what_it_kept_and_cost(run_dir, manifest, report)

    leaks = []
    for root in (run_dir, tmp_path / "logs"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaks += [f"{path}: {name}" for name, v in CANARIES.items() if v.encode() in data]
    assert not leaks, leaks


def _each_point_says_what_it_kept_and_cost(run_dir: Path, manifest: Manifest, report: dict) -> None:
    """data.json, train_metrics.json and metrics.jsonl as the train stage wrote them, and the same facts in the
    report and in the status table."""
    from gptoss_hpc.config import load_run_config
    from gptoss_hpc.config.flops import active_matmul_params
    from gptoss_hpc.config.memory import arch_for

    paths = RunPaths(run_dir)
    facts = {p["dir"]: p["facts"] for p in report["points"]}
    table = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.cli", "status", str(run_dir)], capture_output=True, text=True, check=True
    ).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("p00")}
    for point in manifest.points:
        p = paths.point(point.index)
        data = json.loads(p.data_record.read_text())
        trained = json.loads(p.train_metrics.read_text())
        logged = [json.loads(line) for line in p.metrics.read_text().splitlines()]
        # the collator's CPU count of the documents trained equals TRL's count of non-padding tokens
        assert logged[-1]["doc_tokens"] == logged[-1]["num_input_tokens_seen"] == trained["tokens"] > 0
        arch = arch_for(load_run_config(p.config))
        assert trained["useful_flops"] > 4 * active_matmul_params(arch) * trained["tokens"]  # + attention
        short = "train.max_length=192" in point.overrides
        assert (data["dropped_too_long"] > 0) is short and data["max_length"] == (192 if short else 256)
        f = facts[point.dir]
        assert f["rows_trained"] == data["train_rows"] == trained["train_rows"]
        assert f["rows_dropped"] == data["dropped_too_long"] and f["tokens_trained"] == trained["tokens"]
        assert f["tok_s"] > 0 and f["steady_steps"] == "2-3"  # 3 steps: the second half
        assert f["gpu_hours"] == 0 and f["mfu"] is None and f["peak_gib"] is None  # the ranks ran on the CPU
        assert data["tokens_dropped"] > 0 if short else data["tokens_dropped"] == 0
        length = f"{data['max_length']:,}"
        assert rows[point.dir][1:7] == [*point.overrides, length, f"{f['rows_trained']:,}", str(f["rows_dropped"]), "0"]


def _merged_equals_base_plus_adapter(point) -> None:
    """The merged model, loaded with plain from_pretrained, gives base+adapter's logits (and the adapter
    is not a no-op)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(point.merged).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(point.base), point.adapter).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(ids).logits
        adapted_logits = adapted(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
    assert (merged_logits - adapted_logits).abs().max().item() < 1e-4
    assert (adapted_logits - base_logits).abs().max().item() > 1e-6


def test_a_point_that_fails_at_run_time_cancels_only_its_dependents(tmp_path: Path) -> None:
    from gptoss_hpc.data import load_datasets  # noqa: F401  (the data layer must exist for this test)
    from gptoss_hpc.data.load import sample_path

    good, doomed = tmp_path / "good.jsonl", tmp_path / "doomed.jsonl"
    sample = Path(sample_path()).read_text()
    good.write_text(sample)
    doomed.write_text(sample)
    # Held, so the file is gone before any job can read it: the failure is at run time, after validation.
    run_dir, manifest, _ = _launch(
        ["-m", *FAST, "name=failpoint", "data=local", f"data.path={good},{doomed}", "+cluster.sbatch_extra.hold="],
        tmp_path,
    )
    doomed.unlink()
    subprocess.run(["scontrol", "release", *[j.job_id for j in manifest.jobs]], check=True, capture_output=True)
    states = _wait_all(manifest)
    jobs = {j.stage: j for j in manifest.jobs}
    assert states[f"{jobs['train'].job_id}_0"] == "COMPLETED"
    assert states[f"{jobs['merge'].job_id}_0"] == "COMPLETED"
    assert states[f"{jobs['eval'].job_id}_0"] == "COMPLETED"
    assert states[f"{jobs['train'].job_id}_1"] == "FAILED"
    assert states[f"{jobs['merge'].job_id}_1"] == "CANCELLED"
    assert states[f"{jobs['eval'].job_id}_1"] == "CANCELLED"
    assert states[jobs["report"].job_id] == "COMPLETED"
    status = json.loads(RunPaths(run_dir).point(1).stage_status("train").read_text())
    assert status["state"] == "FAILED" and "doomed.jsonl" in status["error"]
    report = json.loads((RunPaths(run_dir).report / "report.json").read_text())
    by_index = {p["index"]: p for p in report["points"]}
    assert (by_index[0]["state"], by_index[1]["state"]) == ("ok", "failed")
    assert any("doomed.jsonl" in line for line in by_index[1]["errors"]), by_index[1]
    assert report["points_failed"] == 1


def test_sbatch_errors_surface_and_a_half_submitted_launch_is_cancelled(tmp_path: Path) -> None:
    """The second sbatch fails (a shim in front of the real one, the way a site limit would): the launcher
    exits non-zero with sbatch's stderr, names what it had submitted and cancels it."""
    import shutil

    real = shutil.which("sbatch")
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    count = tmp_path / "calls"
    (shim_dir / "sbatch").write_text(
        f'#!/bin/sh\necho x >> "{count}"\n'
        f'if [ "$(wc -l < "{count}")" -ge 2 ]; then echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; fi\n'
        f'exec "{real}" "$@"\n'
    )
    (shim_dir / "sbatch").chmod(0o755)
    run_root = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *FAST, "name=halfsubmit", "+cluster.sbatch_extra.hold=",
         f"run_root={run_root}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "submitting the merge stage failed" in proc.stderr
    assert "QOSMaxSubmitJobPerUserLimit" in proc.stderr
    train_id = proc.stderr.split("already submitted by this launch: train ")[1].split(";")[0]
    assert "cancelled them" in proc.stderr
    time.sleep(3)  # sacct lags a little behind scancel
    assert _sacct([train_id])[train_id][0] == "CANCELLED"


def test_unknown_partition_is_sbatchs_error_and_nothing_is_submitted(tmp_path: Path) -> None:
    run_root = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *FAST, "cluster.partition=nosuchpartition", f"run_root={run_root}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "submitting the train stage failed" in proc.stderr
    assert "invalid partition" in proc.stderr.lower()
    assert "already submitted by this launch: none" in proc.stderr
