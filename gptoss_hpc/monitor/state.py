"""The state of every job of a launch, from launch.json + one sacct and one squeue call (or, for the local
backend, the points' status/<stage>.json), and the readers of a run directory (status files, metrics.jsonl,
a point's logs and their tails): what `status`, `logs`, `cancel` and the report stage all read. No rendering.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import RunPaths, point_dirname
from gptoss_hpc.submission import slurm
from gptoss_hpc.submission.manifest import MANIFEST, JobRecord, Manifest

log = logging.getLogger(__name__)

DEFAULT_RUN_ROOT = "logs"
STDERR_TAIL_LINES = 10
_TAIL_BYTES = 16384


class LaunchNotFoundError(GptossHpcError):
    """No launch matches what the user asked for (run dir, experiment name or job id)."""


# ------------------------------------------------------------------------------------------ launches


def _manifests(run_root: Path, name: str = "*") -> list[Path]:
    """launch.json files under <run_root>/<name>/<timestamp>/, newest first (by file time)."""
    found = []
    for path in run_root.glob(f"{name}/*/{MANIFEST}"):
        try:
            found.append((path.stat().st_mtime_ns, str(path), path))
        except OSError:
            continue
    return [p for _, _, p in sorted(found, reverse=True)]


def newest_run_dirs(run_root: str | Path, limit: int | None = None) -> list[Path]:
    paths = _manifests(Path(run_root))
    return [p.parent for p in paths[:limit]]


def resolve_run_dir(target: str | None, run_root: str | Path = DEFAULT_RUN_ROOT) -> Path:
    """A run dir (holds launch.json), an experiment name (its newest launch) or None (newest launch)."""
    root = Path(run_root)
    if target:
        as_path = Path(target)
        if (as_path / MANIFEST).is_file():
            return as_path.resolve()
        if as_path.exists() or os.sep in target:
            raise LaunchNotFoundError(f"{target} is not a launch directory (no {MANIFEST} in it)")
        found = _manifests(root, target)
        if not found:
            raise LaunchNotFoundError(
                f"no launch of experiment {target!r} under {root}/ (looked for {root}/{target}/*/{MANIFEST});"
                " pass a run dir or --run-root"
            )
        return found[0].parent.resolve()
    found = _manifests(root)
    if not found:
        raise LaunchNotFoundError(f"no launch under {root}/ (no {root}/*/*/{MANIFEST}); pass a run dir or --run-root")
    return found[0].parent.resolve()


def load_manifest(run_dir: str | Path) -> Manifest:
    """launch.json of run_dir; its run_dir is set to where it was read (a launch dir may be moved)."""
    try:
        manifest = Manifest.load(run_dir)
    except GptossHpcError as exc:
        raise LaunchNotFoundError(str(exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise LaunchNotFoundError(f"{Path(run_dir) / MANIFEST} is not a valid launch manifest: {exc}") from exc
    manifest.run_dir = str(Path(run_dir).resolve())
    return manifest


# -------------------------------------------------------------------------------------------- rows


@dataclass
class JobRow:
    """One Slurm job or array task of a launch, as the table shows it."""

    stage: str
    job_id: str  # "123_4" for array task 4, "124" for a plain job
    points: list[int]
    overrides: list[str] = field(default_factory=list)
    state: str = "UNKNOWN"
    elapsed: str = ""
    node: str = ""
    reason: str = ""
    exit_code: str = ""
    step: int | None = None
    loss: float | None = None
    log_out: str = ""
    log_err: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    error: str = ""  # the error line of the point's status/<stage>.json (rank 0's exception)
    endpoint: str = ""  # serve jobs: URL, model id and where the API key is (never the key)
    warnings: list[str] = field(default_factory=list)  # what the stage survived: "push failed: ...", W&B

    @property
    def terminal(self) -> bool:
        return self.state in slurm.TERMINAL_STATES

    @property
    def failed(self) -> bool:
        return self.terminal and self.state != "COMPLETED"


@dataclass
class LaunchStatus:
    run_dir: str
    name: str
    backend: str
    source: str  # "sacct" | "squeue" | "status files"
    rows: list[JobRow]
    note: str = ""  # e.g. why sacct was not used
    points: list[dict[str, Any]] = field(default_factory=list)  # what each point kept and cost (monitor/records.py)

    @property
    def all_terminal(self) -> bool:
        return all(r.terminal for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "name": self.name,
            "backend": self.backend,
            "source": self.source,
            "note": self.note,
            "all_terminal": self.all_terminal,
            "counts": self.counts(),
            "jobs": [asdict(r) for r in self.rows],
            "points": self.points,
        }

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.state] = out.get(r.state, 0) + 1
        return out


def log_paths(run_dir: Path, record: JobRecord, task_id: str) -> tuple[Path, Path]:
    """submitit's rank-0 logs: <log_dir>/<jobid>_<task>_0_log.{out,err} (array) or <jobid>_0_log.* ."""
    folder = run_dir / record.log_dir
    return folder / f"{task_id}_0_log.out", folder / f"{task_id}_0_log.err"


def is_plain_single(run_dir: Path, record: JobRecord) -> bool:
    """A one-point "array" that submitit submitted as a plain job (it does so for any 1-element
    map_array/batch): its id is "<id>", not "<id>_<point>". Told by submitit's pickle names."""
    if not record.array or len(record.points) != 1:
        return False
    folder = run_dir / record.log_dir
    return (folder / f"{record.job_id}_submitted.pkl").exists() and not (
        folder / f"{record.job_id}_{record.points[0]}_submitted.pkl"
    ).exists()


def task_ids(run_dir: Path, record: JobRecord) -> list[tuple[str, list[int]]]:
    """(Slurm id, points) of every job/array task of a record: ("123_4", [4]), or ("124", [...])."""
    if record.array and not is_plain_single(run_dir, record):
        return [(f"{record.job_id}_{p}", [p]) for p in record.points]
    return [(record.job_id, list(record.points))]


def job_rows(manifest: Manifest) -> list[JobRow]:
    """Every job (array task) the manifest records, in submission order, without states yet."""
    run_dir = Path(manifest.run_dir)
    overrides = {p.index: p.overrides for p in manifest.points}
    rows = []
    failed_points: set[int] = set()  # local: points an earlier stage failed on (run_local skips them)
    for rec in manifest.jobs:
        if manifest.backend == "local" and len(rec.points) > 1:
            # run_local records one comma-separated id per point it started, in order, none for skipped ones
            ids = [i for i in rec.job_id.split(",") if i]
            started = [p for p in rec.points if p not in failed_points]
            if len(started) != len(ids):
                started = rec.points if len(ids) == len(rec.points) else []
            by_point = dict(zip(started, ids, strict=False))
            for p in rec.points:
                if _local_state(run_dir, p, rec.stage) == "FAILED":
                    failed_points.add(p)
                job_id = by_point.get(p, "")
                out, err = log_paths(run_dir, rec, job_id) if job_id else (Path(), Path())
                rows.append(
                    JobRow(
                        stage=rec.stage,
                        job_id=job_id,
                        points=[p],
                        overrides=list(overrides.get(p, [])),
                        log_out=str(out) if job_id else "",
                        log_err=str(err) if job_id else "",
                    )
                )
            continue
        for task_id, pts in task_ids(run_dir, rec):
            out, err = log_paths(run_dir, rec, task_id)
            rows.append(
                JobRow(
                    stage=rec.stage,
                    job_id=task_id,
                    points=pts,
                    overrides=list(overrides.get(pts[0], [])) if len(pts) == 1 else [],
                    log_out=str(out),
                    log_err=str(err),
                )
            )
    return rows


def tail_lines(path: str | Path, n: int = STDERR_TAIL_LINES) -> list[str]:
    """The last n lines of a text file (reads at most 16 KiB); [] if it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]  # first line is probably cut
    return [ln.rstrip() for ln in lines if ln.strip()][-n:]


def last_metrics(path: str | Path) -> tuple[int | None, float | None]:
    """Last logged (step, loss) of a metrics.jsonl (JSON lines with "step" and "loss")."""
    step: int | None = None
    loss: float | None = None
    for line in reversed(tail_lines(path, 50)):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if step is None and isinstance(rec.get("step"), int | float):
            step = int(rec["step"])
        if loss is None and isinstance(rec.get("loss"), int | float):
            loss = float(rec["loss"])
        if step is not None and loss is not None:
            break
    return step, loss


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file (status/<stage>.json, eval/eval.json); None when missing, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_stage_status(run_dir: Path, point: int, stage: str) -> dict[str, Any] | None:
    """pNNN/status/<stage>.json: the stage's own record (state, error, warnings, host)."""
    return read_json(RunPaths(run_dir).point(point).stage_status(stage))


def read_metrics(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training rows of metrics.jsonl; a torn last line is ignored."""
    steps: list[int] = []
    losses: list[float] = []
    if not path.is_file():
        return steps, losses
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), int | float) and "step" in row:
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def point_log_files(run: RunPaths, job: JobRecord | None, stage: str, point: int) -> list[Path]:
    """The stage's log files for one point, stderr first: array task logs <array>_<point>_*_log.*, or (one job
    per point) the job at the point's position in the manifest's id list."""
    folder = run.slurm(stage)
    if not folder.is_dir():
        return []
    patterns: list[str] = []
    if job is not None and job.array:
        patterns.append(f"{job.job_id}_{point}_*_log.*")
    elif job is not None:
        ids = [i for i in job.job_id.split(",") if i]
        if len(ids) == len(job.points) and point in job.points:
            patterns.append(f"{ids[job.points.index(point)]}_*_log.*")
        elif len(ids) == 1:
            patterns.append(f"{ids[0]}_*_log.*")
    else:
        patterns.append(f"*_{point}_*_log.*")
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(folder.glob(pattern), key=lambda p: (p.suffix != ".err", p.name)))
    return found


def log_tail(files: Sequence[Path], lines: int = STDERR_TAIL_LINES) -> list[str]:
    """'<name>:' and the last non-empty lines of the first log file (stderr first) that has any."""
    for path in files:
        kept = tail_lines(path, lines)
        if kept:
            return [f"{path.name}:", *kept]
    return []


def _local_state(run_dir: Path, point: int, stage: str) -> str | None:
    rec = read_stage_status(run_dir, point, stage)
    return str(rec.get("state")) if rec is not None else None


def _status_error(run_dir: Path, point: int, stage: str) -> str:
    """The error line the stage recorded in pNNN/status/<stage>.json when it FAILED (e.g. requeues used up)."""
    rec = read_stage_status(run_dir, point, stage)
    if rec is None or rec.get("state") != "FAILED":
        return ""
    return str(rec.get("error") or "")


def _fill_local(rows: list[JobRow], run_dir: Path) -> None:
    """Local backend: states from pNNN/status/<stage>.json (missing → PENDING: not started)."""
    paths = RunPaths(run_dir)
    for row in rows:
        stage_files = (
            [paths.point(p).stage_status(row.stage) for p in row.points]
            if row.points
            else [run_dir / "status" / f"{row.stage}.json"]
        )
        if not row.points and (paths.report / "report.json").is_file():
            row.state = "COMPLETED"  # the report stage writes report/report.json, no status file
            continue
        states = []
        for f in stage_files:
            rec = read_json(f)
            if rec is None:
                states.append("PENDING")
                continue
            states.append(str(rec.get("state", "UNKNOWN")))
            if rec.get("error"):
                row.error = str(rec["error"])
            if rec.get("host"):
                row.node = str(rec["host"])
        for s in ("FAILED", "RUNNING", "PENDING", "UNKNOWN", "COMPLETED"):
            if s in states:
                row.state = s
                break
    # run_local skips the later stages of a point whose earlier stage failed: those never run
    broken = {p for r in rows if r.failed for p in r.points}
    for row in rows:
        if row.state == "PENDING" and row.points and set(row.points) <= broken:
            row.state = "CANCELLED"


def _fill_from_status_file(row: JobRow, run_dir: Path) -> None:
    """The point's own record of this stage: its warnings, and (Slurm) the error line sacct cannot give."""
    if len(row.points) != 1 or row.state == "PENDING":
        return
    rec = read_stage_status(run_dir, row.points[0], row.stage)
    if rec is None:
        return
    row.warnings = [str(w) for w in rec.get("warnings") or []]
    if row.failed and not row.error and rec.get("state") == "FAILED" and rec.get("error"):
        row.error = str(rec["error"])


def _fill_slurm(rows: list[JobRow], manifest: Manifest, use_sacct: bool) -> tuple[str, str]:
    result = slurm.query([j.job_id for j in manifest.jobs], tasks=[r.job_id for r in rows], use_sacct=use_sacct)
    for row in rows:
        st = result.get(row.job_id)
        if st is None:
            # a just-submitted job sacct does not know yet, or one Slurm has forgotten
            continue
        row.state, row.elapsed, row.node = st.state, st.elapsed, st.node
        row.reason, row.exit_code = st.reason, st.exit_code
        if row.state == "NODE_FAIL":
            # which node of the allocation failed, and why (slurmctld's reason, e.g. "Not responding")
            down = slurm.node_reasons(row.node)
            row.error = "node failure: " + (
                "; ".join(f"{n}: {why}" for n, why in sorted(down.items())) or f"a node of {row.node}"
            )
        elif row.failed and len(row.points) == 1:
            row.error = _status_error(Path(manifest.run_dir), row.points[0], row.stage)
    note = ""
    if result.source == "squeue":
        note = result.sacct_error or "sacct not used"
    return result.source, note


def serve_endpoint(status_file: Path) -> str:
    """'<url> · model <id> · API key: <where>' while a serve job runs (its status/serve.json); '' otherwise."""
    rec = read_json(status_file)
    if rec is None or rec.get("state") != "RUNNING" or not rec.get("url"):
        return ""
    if rec.get("api_key_file"):
        key = f"in {rec['api_key_file']} (mode 600)"
    else:
        key = f"${rec.get('api_key_source', 'SERVE_API_KEY')} of the submitting shell"
    return f"{rec['url']} · model {rec.get('model', '?')} · API key {key}"


def collect(run_dir: str | Path, *, use_sacct: bool = True) -> LaunchStatus:
    """The status of every job of the launch in run_dir (one sacct + at most one squeue call)."""
    manifest = load_manifest(run_dir)
    rdir = Path(manifest.run_dir)
    rows = job_rows(manifest)
    if manifest.backend == "local":
        _fill_local(rows, rdir)
        source, note = "status files", ""
    else:
        source, note = _fill_slurm(rows, manifest, use_sacct)
    for row in rows:
        if row.stage == "train" and len(row.points) == 1 and row.state != "PENDING":
            row.step, row.loss = last_metrics(rdir / point_dirname(row.points[0]) / "metrics.jsonl")
        if row.failed:
            row.stderr_tail = tail_lines(row.log_err)
        if row.stage == "serve" and len(row.points) == 1:
            row.endpoint = serve_endpoint(rdir / point_dirname(row.points[0]) / "status" / "serve.json")
        _fill_from_status_file(row, rdir)
    return LaunchStatus(str(rdir), manifest.name, manifest.backend, source, rows, note)
