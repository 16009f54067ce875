"""status / logs / cancel against the real local Slurm (launchers/local_slurm.sh), plus their CLI errors.

Launches are built here exactly as the launcher builds them: submitit SlurmExecutor arrays
(`map_array`), dependent arrays chained with `aftercorr`, job names `gptoss-<name>-<stage>`, folders
`<run_dir>/slurm/<stage>`, and a launch.json written with `Manifest`. The job bodies are small Python
functions (no model): they sleep, print, append to metrics.jsonl, or raise. Every job a test submits
is cancelled at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from gptoss_hpc import slurm
from gptoss_hpc.monitor.state import LaunchStatus, collect
from gptoss_hpc.paths import point_dirname
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------------------- job bodies (pickled
# by value: the job's python cannot import this test module)


def train_like(point: int, run_dir: str, steps: int, fail_point: int) -> str:
    """Logs a step and a loss every 0.5 s to pNNN/metrics.jsonl; the fail_point raises at step 2."""
    import json as _json
    import sys as _sys
    import time as _time
    from pathlib import Path as _Path

    metrics = _Path(run_dir) / f"p{point:03d}" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        with open(metrics, "a") as f:
            f.write(_json.dumps({"step": step, "loss": round(2.0 / step, 4)}) + "\n")
        print(f"point {point} step {step}", flush=True)
        if point == fail_point and step == 2:
            print(f"point {point}: about to fail", file=_sys.stderr, flush=True)
            raise ValueError(f"boom at point {point}")
        _time.sleep(0.5)
    return "ok"


def merge_like(point: int) -> int:
    import time as _time

    _time.sleep(0.5)
    return point


def ticker(n: int, every: float) -> int:
    """Prints the attempt number (SLURM_RESTART_COUNT) and n ticks."""
    import os as _os
    import time as _time

    print(f"attempt {_os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
    for i in range(n):
        print(f"tick {i}", flush=True)
        _time.sleep(every)
    return n


import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------- helpers


class Launches:
    """Builds launches like the launcher does and remembers every job id for the final cleanup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.job_ids: list[str] = []

    def run_dir(self, name: str) -> Path:
        d = self.root / name / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        d.mkdir(parents=True)
        return d

    def executor(self, run_dir: Path, name: str, stage: str, **extra: object):
        import submitit

        ex = submitit.SlurmExecutor(folder=run_dir / "slurm" / stage, max_num_timeout=0)
        ex.update_parameters(
            partition="debug",
            job_name=f"gptoss-{name}-{stage}",
            time=10,
            cpus_per_task=1,
            array_parallelism=8,
            additional_parameters=dict(extra),
        )
        return ex

    def submit(
        self,
        name: str,
        stages: list[tuple[str, Callable, list[tuple]]],
        *,
        hold: bool = False,
        array: bool = True,
        run_dir: Path | None = None,
    ) -> Manifest:
        """stages: (stage, fn, one args tuple per point); each stage after the first waits aftercorr."""
        run_dir = run_dir or self.run_dir(name)
        n = len(stages[0][2])
        manifest = Manifest(
            name=name,
            created=datetime.now().isoformat(timespec="seconds"),
            backend="slurm",
            run_dir=str(run_dir),
            points=[PointRecord(i, [f"lora.r={8 * (i + 1)}"], point_dirname(i)) for i in range(n)],
        )
        previous: str | None = None
        for stage, fn, args in stages:
            extra: dict[str, object] = {"hold": True} if hold else {}
            dependency = f"aftercorr:{previous}" if previous else None
            if dependency:
                extra.update(dependency=dependency, kill_on_invalid_dep="yes")
            ex = self.executor(run_dir, name, stage, **extra)
            if array:
                jobs = ex.map_array(fn, *zip(*args, strict=True))
                job_id = jobs[0].job_id.split("_")[0]
            else:
                job_id = ex.submit(fn, *args[0]).job_id
            self.job_ids.append(job_id)
            manifest.jobs.append(
                JobRecord(
                    stage=stage,
                    job_id=job_id,
                    array=array,
                    points=list(range(n)),
                    log_dir=f"slurm/{stage}",
                    dependency=dependency,
                    job_name=f"gptoss-{name}-{stage}",
                )
            )
            previous = job_id
        manifest.save()
        return manifest


def wait_for(
    run_dir: str, pred: Callable[[LaunchStatus], bool], timeout: float = 45, every: float = 0.5
) -> LaunchStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = collect(run_dir)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            rows = "\n".join(f"  {r.stage} {r.job_id} {r.state} {r.reason}" for r in st.rows)
            pytest.fail(f"timed out after {timeout} s waiting on {run_dir}; last states:\n{rows}")
        time.sleep(every)


def rows_by(st: LaunchStatus) -> dict[tuple[str, int], object]:
    return {(r.stage, r.points[0] if r.points else -1): r for r in st.rows}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "220"}
    return subprocess.run(
        [PY, "-m", "gptoss_hpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, local_slurm: Path) -> Iterator[Launches]:
    ls = Launches(tmp_path_factory.mktemp("runs"))
    yield ls
    slurm.scancel(ls.job_ids)  # never leave jobs behind in the shared Slurm


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.slurm
def test_status_lists_running_sweep_with_dependency_reasons(launches: Launches) -> None:
    run = launches.run_dir("sweep")
    m = launches.submit(
        "sweep",
        [
            ("train", train_like, [(i, str(run), 8, 2) for i in range(3)]),
            ("merge", merge_like, [(i,) for i in range(3)]),
        ],
        run_dir=run,
    )
    run_dir = m.run_dir
    train, merge = m.jobs[0].job_id, m.jobs[1].job_id

    st = wait_for(
        run_dir,
        lambda s: rows_by(s)[("train", 0)].state == "RUNNING" and rows_by(s)[("merge", 0)].reason == "Dependency",
    )
    assert [(r.stage, r.job_id) for r in st.rows] == [
        ("train", f"{train}_0"),
        ("train", f"{train}_1"),
        ("train", f"{train}_2"),
        ("merge", f"{merge}_0"),
        ("merge", f"{merge}_1"),
        ("merge", f"{merge}_2"),
    ]
    rows = rows_by(st)
    assert all(rows[("merge", i)].state == "PENDING" for i in range(3))
    assert rows[("train", 1)].overrides == ["lora.r=16"]
    assert rows[("train", 0)].node  # the node it runs on

    # the table, through the console script's module
    out = cli("status", run_dir)
    assert out.returncode == 0, out.stderr
    assert "Dependency" in out.stdout and "RUNNING" in out.stdout and f"{merge}_2" in out.stdout

    # a failed point: FAILED, its exit code, the tail of its submitit stderr, its merge task cancelled
    st = wait_for(run_dir, lambda s: rows_by(s)[("train", 2)].exit_code not in ("", "0:0"))  # sacct lags
    failed = rows_by(st)[("train", 2)]
    assert failed.state == "FAILED"
    assert failed.log_err.endswith(f"slurm/train/{train}_2_0_log.err")
    assert any("boom at point 2" in line for line in failed.stderr_tail), failed.stderr_tail

    # --watch ends by itself once every job is terminal; --json for scripts
    out = cli("status", run_dir, "--watch", "1", "--json", timeout=90)
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["all_terminal"] and final["source"] == "sacct"
    by = {(j["stage"], j["points"][0]): j for j in final["jobs"]}
    seen = {k: (v["state"], v["step"], v["exit_code"], v["reason"]) for k, v in by.items()}
    assert by[("train", 0)]["state"] == "COMPLETED" and by[("train", 0)]["step"] == 8, seen
    assert by[("train", 0)]["loss"] == pytest.approx(0.25)
    assert by[("train", 2)]["state"] == "FAILED" and by[("train", 2)]["step"] == 2, seen
    assert by[("merge", 0)]["state"] == "COMPLETED" and by[("merge", 1)]["state"] == "COMPLETED", seen
    assert by[("merge", 2)]["state"] == "CANCELLED"  # aftercorr on a failed task, kill-on-invalid-dep

    table = cli("status", "sweep", "--run-root", str(launches.root))  # experiment name → newest launch
    assert table.returncode == 0, table.stderr
    assert "boom at point 2" in table.stdout and "FAILED" in table.stdout and "exit 1:0" in table.stdout


@pytest.mark.slurm
def test_logs_follow_streams_a_running_job_and_ends_with_it(launches: Launches) -> None:
    # one point: submitit submits a 1-element map_array as a plain job ("<id>", not "<id>_0"), while
    # the launcher records it as an array; status and logs must find it either way
    m = launches.submit("follow", [("train", ticker, [(6, 0.5)])])
    job = m.jobs[0].job_id
    assert [r.job_id for r in collect(m.run_dir).rows] == [job]
    # started before the job runs: the log file appears late
    proc = subprocess.Popen(
        [PY, "-m", "gptoss_hpc.logs", job, "-f", "--run-root", str(launches.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [ln for ln in out.splitlines() if ln.startswith("tick")] == [f"tick {i}" for i in range(6)]
    assert f"job {job} ended: COMPLETED" in err

    # without -f: the whole file, and the stderr log with --err
    again = cli("logs", m.run_dir)
    assert again.returncode == 0 and "tick 5" in again.stdout
    assert cli("logs", m.run_dir, "--err").returncode == 0


@pytest.mark.slurm
def test_logs_follow_goes_on_into_a_requeued_attempt(launches: Launches) -> None:
    """submitit keeps the job id across a requeue and opens its logs with --open-mode=append."""
    m = launches.submit("requeue", [("train", ticker, [(8, 0.5), (1, 0.1)])])
    task = f"{m.jobs[0].job_id}_0"
    proc = subprocess.Popen(
        [PY, "-m", "gptoss_hpc.logs", task, "-f", "--run-root", str(launches.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    log = Path(m.run_dir) / "slurm" / "train" / f"{task}_0_log.out"
    deadline = time.monotonic() + 30
    while "tick 1" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.3)
    subprocess.run(["scontrol", "requeue", task], check=True, capture_output=True, text=True)
    out, err = proc.communicate(timeout=75)
    assert proc.returncode == 0, err
    assert "attempt 0" in out and "attempt 1" in out  # both attempts, in order
    assert out.index("attempt 0") < out.index("attempt 1")
    second = out[out.index("attempt 1") :]
    assert [ln for ln in second.splitlines() if ln.startswith("tick")] == [f"tick {i}" for i in range(8)]
    assert "truncated" not in err  # appended, not rewritten
    assert f"job {task} ended: COMPLETED" in err


@pytest.mark.slurm
def test_cancel_leaves_other_launches_alone(launches: Launches) -> None:
    doomed = launches.submit(
        "doomed",
        [("train", ticker, [(1, 0.1)] * 3), ("merge", merge_like, [(i,) for i in range(3)])],
        hold=True,
    )
    other = launches.submit("other", [("train", ticker, [(1, 0.1)] * 2)], hold=True)
    out = cli("cancel", "doomed", "--run-root", str(launches.root))
    assert out.returncode == 0, out.stderr
    train, merge = doomed.jobs[0].job_id, doomed.jobs[1].job_id
    for task in [f"{train}_{i}" for i in range(3)] + [f"{merge}_{i}" for i in range(3)]:
        assert task in out.stdout
    # as a job id, not as a substring: the run dir's timestamp in the output can hold the same digits
    assert not re.search(rf"(?<![\d-]){other.jobs[0].job_id}(?![\d-])", out.stdout), out.stdout

    wait_for(doomed.run_dir, lambda s: all(r.state == "CANCELLED" for r in s.rows), timeout=20)
    st = collect(other.run_dir)
    assert [r.state for r in st.rows] == ["PENDING", "PENDING"]
    assert all(r.reason == "JobHeldUser" for r in st.rows)
    again = cli("cancel", doomed.run_dir)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


# ------------------------------------------------------------------------- CLI errors (no Slurm)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    out = cli("status", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "not a launch directory" in _one_line_error(out)

    out = cli("status", "--run-root", str(tmp_path))
    assert out.returncode == 2 and "no launch under" in _one_line_error(out)

    out = cli("logs", "4242424", "--run-root", str(tmp_path))
    assert out.returncode == 2 and "not from any" in _one_line_error(out)

    run = tmp_path / "x" / "20261125-000000"
    run.mkdir(parents=True)
    Manifest("x", "2026-11-25T00:00:00", "slurm", str(run), [PointRecord(0, [], "p000")],
             [JobRecord("train", "4242", True, [0], "slurm/train")]).save()  # fmt: skip
    env_bad = {**os.environ, "SLURM_CONF": str(tmp_path / "missing.conf")}
    proc = subprocess.run(
        [PY, "-m", "gptoss_hpc.cli", "status", str(run)], capture_output=True, text=True, env=env_bad, check=False
    )
    assert proc.returncode == 1 and "Slurm not reachable" in _one_line_error(proc)
    proc = subprocess.run(
        [PY, "-m", "gptoss_hpc.cli", "cancel", str(run)], capture_output=True, text=True, env=env_bad, check=False
    )
    assert proc.returncode == 1 and "Slurm not reachable" in _one_line_error(proc)

    out = cli("report", str(tmp_path / "nope"))  # delegated lazily to gptoss_hpc.stages.report
    assert out.returncode == 1 and "launch.json not found" in _one_line_error(out)

    out = cli("frobnicate")
    assert out.returncode == 2 and "unknown command" in _one_line_error(out)
    helped = cli("--help")
    assert helped.returncode == 0 and "gptoss-hpc logs" in helped.stdout and "examples" in helped.stdout


def test_logs_of_a_local_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """backend local: one comma-joined id per point (submitit LocalExecutor pids), states from status files."""
    from gptoss_hpc.monitor import logs

    run = tmp_path / "loc" / "20261125-000000"
    for i, state in enumerate(["COMPLETED", "FAILED"]):
        (run / point_dirname(i) / "status").mkdir(parents=True)
        (run / point_dirname(i) / "status" / "train.json").write_text(json.dumps({"state": state}))
    (run / "slurm" / "train").mkdir(parents=True)
    (run / "slurm" / "train" / "101_0_log.out").write_text("point 0 says hi\n")
    (run / "slurm" / "train" / "102_0_log.err").write_text("Traceback ...\nValueError: boom\n")
    Manifest("loc", "2026-11-25T00:00:00", "local", str(run),
             [PointRecord(0, [], "p000"), PointRecord(1, [], "p001")],
             [JobRecord("train", "101,102", False, [0, 1], "slurm/train"),
              JobRecord("merge", "103", False, [0, 1], "slurm/merge")]).save()  # fmt: skip

    assert logs.main([str(run)]) == 0
    assert capsys.readouterr().out == "point 0 says hi\n"
    assert logs.main(["102", "--err", "--run-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("ValueError: boom\n")
    assert logs.main([str(run), "--point", "1", "--err", "-f"]) == 0  # FAILED: prints and ends at once
    assert "boom" in capsys.readouterr().out
    assert logs.main([str(run), "--stage", "merge", "--point", "1"]) == 1  # skipped: train failed
    assert "never started" in capsys.readouterr().err
    assert logs.main([str(run), "--stage", "merge", "--point", "0"]) == 1  # 103 ran point 0: no log yet
    assert "103_0_log.out does not exist" in capsys.readouterr().err
    assert logs.main([str(run), "--point", "7"]) == 2
    assert "point 7 is not in" in capsys.readouterr().err


def test_follow_waits_for_a_late_file_and_rereads_a_truncated_one(tmp_path: Path) -> None:
    """Plain `sbatch` truncates the log of a requeued job (seen here: 139 → 38 bytes, same inode);
    submitit appends (--open-mode=append). follow() must handle both, and a file that appears late."""
    import io
    import threading

    from gptoss_hpc.monitor.logs import follow

    log = tmp_path / "1_0_log.out"
    state = {"now": "PENDING"}
    out, notes = io.StringIO(), []

    def writer() -> None:
        time.sleep(0.3)
        log.write_text("attempt 0\ntick 0\ntick 1\n")
        state["now"] = "RUNNING"
        time.sleep(0.4)
        log.write_text("attempt 1\n")  # requeued: truncated and rewritten
        time.sleep(0.4)
        with open(log, "a") as f:
            f.write("tick 0\n")
        state["now"] = "COMPLETED"

    t = threading.Thread(target=writer)
    t.start()
    final = follow(log, lambda: state["now"], out, poll_s=0.05, state_every_s=0.1, notice=notes.append)
    t.join()
    assert final == "COMPLETED"
    assert out.getvalue() == "attempt 0\ntick 0\ntick 1\nattempt 1\ntick 0\n"
    assert any("truncated" in n for n in notes)
