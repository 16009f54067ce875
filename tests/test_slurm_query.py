"""Fast unit tests of the sacct/squeue parsing, on text captured from the local Slurm (22.05.8) on
2026-11-25: a 4-task train array (%2 throttle, task 2 exits 3), a dependent merge array (aftercorr) and
a held 10-task array. No Slurm needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gptoss_hpc import slurm
from gptoss_hpc.monitor.run_files import last_metrics, tail_lines
from gptoss_hpc.monitor.state import JobRow, collect, log_paths
from gptoss_hpc.slurm import SlurmNotReachableError
from gptoss_hpc.slurm_states import expand_task_ids, merge_states, normalize_state, parse_sacct, parse_squeue
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord

# 2.5 s after submission: train tasks 0,1 run, 2-3 wait on the %2 throttle, merge waits on train.
SACCT_RUNNING = """\
13_0|RUNNING|0:0|00:00:03|vm|gptoss-probe-train
13_0.batch|RUNNING|0:0|00:00:03|vm|batch
13_1|RUNNING|0:0|00:00:03|vm|gptoss-probe-train
13_1.batch|RUNNING|0:0|00:00:03|vm|batch
13_[2-3%2]|PENDING|0:0|00:00:00|None assigned|gptoss-probe-train
14_0|PENDING|0:0|00:00:00|None assigned|gptoss-probe-merge
14_1|PENDING|0:0|00:00:00|None assigned|gptoss-probe-merge
14_2|PENDING|0:0|00:00:00|None assigned|gptoss-probe-merge
14_3|PENDING|0:0|00:00:00|None assigned|gptoss-probe-merge
15_[0-9]|PENDING|0:0|00:00:00|None assigned|gptoss-probe-held
"""
SQUEUE_RUNNING = """\
13_2|PENDING|JobArrayTaskLimit|0:00||gptoss-probe-train
13_3|PENDING|JobArrayTaskLimit|0:00||gptoss-probe-train
14_3|PENDING|Dependency|0:00||gptoss-probe-merge
14_2|PENDING|Dependency|0:00||gptoss-probe-merge
14_1|PENDING|Dependency|0:00||gptoss-probe-merge
14_0|PENDING|Dependency|0:00||gptoss-probe-merge
15_0|PENDING|JobHeldUser|0:00||gptoss-probe-held
15_9|PENDING|JobHeldUser|0:00||gptoss-probe-held
13_0|RUNNING|None|0:03|vm|gptoss-probe-train
13_1|RUNNING|None|0:03|vm|gptoss-probe-train
"""
# The end: task 2 failed (exit 3), so merge task 2 was cancelled (kill_invalid_depend).
SACCT_DONE = """\
13_0|COMPLETED|0:0|00:00:04|vm|gptoss-probe-train
13_0.batch|COMPLETED|0:0|00:00:04|vm|batch
13_1|COMPLETED|0:0|00:00:04|vm|gptoss-probe-train
13_2|FAILED|3:0|00:00:04|vm|gptoss-probe-train
13_2.batch|FAILED|3:0|00:00:04|vm|batch
13_3|COMPLETED|0:0|00:00:04|vm|gptoss-probe-train
14_0|COMPLETED|0:0|00:00:01|vm|gptoss-probe-merge
14_1|COMPLETED|0:0|00:00:01|vm|gptoss-probe-merge
14_2|CANCELLED|0:0|00:00:00|None assigned|gptoss-probe-merge
14_3|COMPLETED|0:0|00:00:01|vm|gptoss-probe-merge
14_3.batch|COMPLETED|0:0|00:00:01|vm|batch
16|CANCELLED by 0|0:0|00:00:01|vm|gptoss-probe-report
16.batch|CANCELLED|0:15|00:00:01|vm|batch
16.extern|COMPLETED|0:0|00:00:01|vm|extern
"""


def test_expand_grouped_array_ids() -> None:
    assert expand_task_ids("13_[2-3%2]") == ["13_2", "13_3"]
    assert expand_task_ids("15_[0-2,7,9-10]") == ["15_0", "15_1", "15_2", "15_7", "15_9", "15_10"]
    assert expand_task_ids("15_[0-6:3]") == ["15_0", "15_3", "15_6"]
    assert expand_task_ids("15_4") == ["15_4"]
    assert expand_task_ids("16") == ["16"]


def test_normalize_state() -> None:
    assert normalize_state("CANCELLED by 0") == "CANCELLED"
    assert normalize_state("COMPLETED+") == "COMPLETED"
    assert normalize_state("") == "UNKNOWN"


def test_parse_sacct_skips_steps_and_expands_pending_arrays() -> None:
    states = parse_sacct(SACCT_RUNNING)
    assert sorted(states) == sorted(
        ["13_0", "13_1", "13_2", "13_3", "14_0", "14_1", "14_2", "14_3"] + [f"15_{i}" for i in range(10)]
    )
    assert states["13_0"].state == "RUNNING" and states["13_0"].node == "vm"
    assert states["13_0"].elapsed == "00:00:03" and states["13_0"].source == "sacct"
    assert states["13_3"].state == "PENDING" and states["13_3"].node == ""  # "None assigned"
    assert not any(s.name in ("batch", "extern") for s in states.values())


def test_parse_sacct_final_states_and_exit_codes() -> None:
    states = parse_sacct(SACCT_DONE)
    assert states["13_2"].state == "FAILED" and states["13_2"].exit_code == "3:0"
    assert states["13_2"].terminal
    assert states["14_2"].state == "CANCELLED"
    assert states["16"].state == "CANCELLED"  # "CANCELLED by 0"
    assert "16.batch" not in states and "16.extern" not in states


def test_task_lines_win_over_stale_range_lines() -> None:
    """Captured: train 379 task 2 failed, so merge 380 task 2 was cancelled (aftercorr), while merge
    tasks 0 and 1 ran. sacct keeps printing the meta record with the submitted range; while train
    tasks 0 and 1 ran, it listed only task 2."""
    states = parse_sacct(
        "379_0|COMPLETED|0:0|00:00:04|vm|t\n379_1|COMPLETED|0:0|00:00:04|vm|t\n"
        "379_2|FAILED|1:0|00:00:01|vm|t\n380_0|COMPLETED|0:0|00:00:01|vm|m\n"
        "380_1|COMPLETED|0:0|00:00:01|vm|m\n380_[0-2]|CANCELLED|0:0|00:00:00|None assigned|m\n"
    )
    assert states["380_0"].state == "COMPLETED" and not states["380_0"].grouped
    assert states["380_2"].state == "CANCELLED" and states["380_2"].grouped
    early = parse_sacct("379_2|FAILED|1:0|00:00:01|vm|t\n380_[0-2]|CANCELLED|0:0|00:00:00|None assigned|m\n")
    res = slurm.QueryResult(early, "sacct")
    assert res.get("379_0") is None  # not "FAILED" from somewhere else: unknown until squeue says
    live = merge_states(early, parse_squeue("379_0|RUNNING|None|0:03|vm|t\n380_0|PENDING|Dependency|0:00||m\n"))
    assert live["379_0"].state == "RUNNING" and live["380_0"].state == "PENDING"
    assert live["380_0"].reason == "Dependency"


def test_parse_squeue_reasons() -> None:
    states = parse_squeue(SQUEUE_RUNNING)
    assert states["14_0"].reason == "Dependency"
    assert states["13_2"].reason == "JobArrayTaskLimit"
    assert states["15_9"].reason == "JobHeldUser"
    assert states["13_0"].reason == ""  # "None"
    assert states["13_0"].state == "RUNNING" and states["13_0"].elapsed == "0:03"


def test_merge_prefers_sacct_and_adds_reasons_and_lagging_jobs() -> None:
    sacct = parse_sacct(SACCT_RUNNING)
    squeue = parse_squeue(SQUEUE_RUNNING + "17_0|PENDING|Priority|0:00||gptoss-new-train\n")
    merged = merge_states(sacct, squeue)
    assert merged["14_1"].state == "PENDING" and merged["14_1"].reason == "Dependency"
    assert merged["14_1"].source == "sacct"
    assert merged["17_0"].source == "squeue"  # sacct lags just after a submission
    assert merged["17_0"].reason == "Priority"
    # sacct lags behind the controller: squeue's state wins, sacct's stale exit code is dropped
    lagging = parse_sacct("18_0|PENDING|0:0|00:00:00|None assigned|x\n19_0|RUNNING|0:0|00:00:02|vm|x\n")
    live = parse_squeue("18_0|RUNNING|None|0:02|vm|x\n19_0|FAILED|NonZeroExitCode|0:03|vm|x\n")
    both = merge_states(lagging, live)
    assert both["18_0"].state == "RUNNING" and both["18_0"].node == "vm"
    assert both["19_0"].state == "FAILED" and both["19_0"].exit_code == ""
    assert both["19_0"].reason == "NonZeroExitCode" and both["19_0"].source == "squeue"
    done = merge_states(parse_sacct(SACCT_DONE), parse_squeue("13_2|FAILED|NonZeroExitCode|0:04|vm|x\n"))
    assert done["13_2"].exit_code == "3:0" and done["13_2"].elapsed == "00:00:04"
    assert merge_states(None, squeue) == squeue


def _fake_run(outputs: dict[str, subprocess.CompletedProcess | Exception], calls: list[list[str]]):
    def run(cmd, **kwargs):
        calls.append(cmd)
        out = outputs[cmd[0]]
        if isinstance(out, Exception):
            raise out
        return out

    return run


def test_unsplit_array_record_stands_for_its_tasks() -> None:
    # captured 1 s after `scancel` of a held array (205) and its dependent array (206)
    sacct = parse_sacct(
        "205|CANCELLED by 0|0:0|00:00:00|None assigned|allocation\n"
        "206|CANCELLED by 0|0:0|00:00:00|None assigned|allocation\n"
    )
    res = slurm.QueryResult(sacct, "sacct")
    assert res.get("205_2").state == "CANCELLED" and res.get("206_0").terminal
    assert res.get("207_0") is None


def test_query_one_sacct_one_squeue_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    ok = subprocess.CompletedProcess
    monkeypatch.setattr(
        subprocess,
        "run",
        _fake_run({"sacct": ok([], 0, SACCT_RUNNING, ""), "squeue": ok([], 0, SQUEUE_RUNNING, "")}, calls),
    )
    res = slurm.query(["13", "14", "15"])
    assert [c[0] for c in calls] == ["sacct", "squeue"]
    assert "13,14,15" in calls[0] and "13,14,15" in calls[1]
    assert res.source == "sacct" and res.states["14_0"].reason == "Dependency"

    # all finished per sacct: no squeue call
    calls.clear()
    monkeypatch.setattr(subprocess, "run", _fake_run({"sacct": ok([], 0, SACCT_DONE, "")}, calls))
    done = ["13_0", "13_1", "13_2", "13_3", "14_0", "14_1", "14_2", "14_3", "16"]
    assert slurm.query(["13", "14", "16"], tasks=done).source == "sacct"
    assert [c[0] for c in calls] == ["sacct"]
    # a task sacct does not list on its own line yet (it lists running array tasks late): ask squeue
    calls.clear()
    monkeypatch.setattr(
        subprocess,
        "run",
        _fake_run(
            {"sacct": ok([], 0, SACCT_DONE, ""), "squeue": ok([], 0, "13_4|RUNNING|None|0:01|vm|x\n", "")}, calls
        ),
    )
    res = slurm.query(["13"], tasks=["13_0", "13_4"])
    assert [c[0] for c in calls] == ["sacct", "squeue"] and res.states["13_4"].state == "RUNNING"

    # accounting disabled: squeue only, and the header can say why
    calls.clear()
    err = subprocess.CalledProcessError(1, ["sacct"], "", "sacct: error: Slurm accounting storage is disabled\n")
    monkeypatch.setattr(subprocess, "run", _fake_run({"sacct": err, "squeue": ok([], 0, SQUEUE_RUNNING, "")}, calls))
    res = slurm.query(["13", "14"])
    assert res.source == "squeue" and "accounting storage is disabled" in res.sacct_error
    assert res.states["13_0"].state == "RUNNING"


def test_unreachable_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = subprocess.CalledProcessError(
        1,
        ["squeue"],
        "",
        "squeue: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
        "squeue: error: fetch_config: DNS SRV lookup failed\n"
        "squeue: error: _establish_config_source: failed to fetch config\n"
        "squeue: fatal: Could not establish a configuration source\n",
    )
    monkeypatch.setattr(subprocess, "run", _fake_run({"sacct": err, "squeue": err}, []))
    with pytest.raises(SlurmNotReachableError) as info:
        slurm.query(["13"])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Slurm not reachable") and "SLURM_CONF" in msg

    def missing(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(SlurmNotReachableError, match="not installed"):
        slurm.check_reachable()
    assert not slurm.available()


def test_squeue_forgotten_job_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    err = subprocess.CalledProcessError(1, ["squeue"], "", "slurm_load_jobs error: Invalid job id specified\n")
    monkeypatch.setattr(subprocess, "run", _fake_run({"squeue": err}, []))
    assert slurm.squeue(["99999"]) == {}


def test_log_paths_match_submitit_naming(tmp_path: Path) -> None:
    from submitit.core.utils import JobPaths

    rec = JobRecord(stage="train", job_id="13", array=True, points=[0, 1], log_dir="slurm/train")
    out, err = log_paths(tmp_path, rec, "13_1")
    # submitit's sbatch --output for arrays: %A_%a_0_log.out ; JobPaths for task 13_1, rank 0:
    assert out == JobPaths(tmp_path / "slurm/train", job_id="13_1", task_id=0).stdout
    assert err == JobPaths(tmp_path / "slurm/train", job_id="13_1", task_id=0).stderr
    plain = JobRecord(stage="report", job_id="16", array=False, points=[], log_dir="slurm/report")
    assert log_paths(tmp_path, plain, "16")[1] == tmp_path / "slurm/report/16_0_log.err"


def test_tail_and_metrics(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 3.0 - i / 10}) for i in range(1, 2000)]
    f.write_text("\n".join([*lines, json.dumps({"step": 1999, "eval_loss": 1.0}), "{broken"]) + "\n")
    assert last_metrics(f) == (1999, pytest.approx(3.0 - 1999 / 10))
    assert last_metrics(tmp_path / "missing.jsonl") == (None, None)
    assert tail_lines(f, 2) == [json.dumps({"step": 1999, "eval_loss": 1.0}), "{broken"]


def test_local_backend_reads_status_files(tmp_path: Path) -> None:
    """run_local records comma-joined local ids; states come from pNNN/status/<stage>.json."""
    run = tmp_path / "demo" / "20261125-081500"
    for i, state in enumerate(["COMPLETED", "FAILED"]):
        (run / f"p00{i}" / "status").mkdir(parents=True)
        rec = {"stage": "train", "state": state, "host": "h", **({"error": "ValueError: boom"} if i else {})}
        (run / f"p00{i}" / "status" / "train.json").write_text(json.dumps(rec))
    (run / "p000" / "status" / "merge.json").write_text(json.dumps({"stage": "merge", "state": "RUNNING"}))
    Manifest(
        name="demo",
        created="2026-11-25T08:15:00",
        backend="local",
        run_dir=str(run),
        points=[PointRecord(0, ["lora.r=8"], "p000"), PointRecord(1, ["lora.r=16"], "p001")],
        jobs=[
            JobRecord("train", "101,102", False, [0, 1], "slurm/train"),
            JobRecord("merge", "103", False, [0, 1], "slurm/merge"),
            JobRecord("report", "104", False, [], "slurm/report"),
        ],
    ).save()
    (run / "report").mkdir()
    (run / "report" / "report.json").write_text("{}")
    st = collect(run)
    assert st.source == "status files"
    got = {(r.stage, r.points[0] if r.points else -1): r for r in st.rows}
    assert got[("train", 0)].state == "COMPLETED" and got[("train", 0)].job_id == "101"
    assert got[("train", 1)].state == "FAILED" and got[("train", 1)].error == "ValueError: boom"
    assert got[("train", 1)].overrides == ["lora.r=16"]
    assert got[("merge", 0)].state == "RUNNING"
    assert got[("merge", 1)].state == "CANCELLED"  # skipped: its train failed
    assert got[("report", -1)].state == "COMPLETED" and got[("report", -1)].log_err.endswith("104_0_log.err")
    assert not st.all_terminal
    assert isinstance(st.rows[0], JobRow)
