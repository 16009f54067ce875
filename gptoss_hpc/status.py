"""Where is every job of a launch? One table (or JSON) from launch.json + one sacct and one squeue call.

    python -m gptoss_hpc.status                      # newest launch under logs/
    python -m gptoss_hpc.status demo                 # newest launch of experiment "demo"
    python -m gptoss_hpc.status logs/demo/20261125-081500 --json
    python -m gptoss_hpc.status --watch 5            # refresh every 5 s until every job has ended

States come from sacct when accounting works, from squeue otherwise (the header says which); for the
"local" backend from the points' status/<stage>.json files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptoss_hpc import slurm_query
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import RunPaths, point_dirname
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
    error: str = ""  # local backend: the error line of status/<stage>.json

    @property
    def terminal(self) -> bool:
        return self.state in slurm_query.TERMINAL_STATES

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


def _local_state(run_dir: Path, point: int, stage: str) -> str | None:
    try:
        return str(json.loads(RunPaths(run_dir).point(point).stage_status(stage).read_text()).get("state"))
    except (OSError, ValueError, AttributeError):
        return None


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
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
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


def _fill_slurm(rows: list[JobRow], manifest: Manifest, use_sacct: bool) -> tuple[str, str]:
    result = slurm_query.query([j.job_id for j in manifest.jobs], tasks=[r.job_id for r in rows], use_sacct=use_sacct)
    for row in rows:
        st = result.get(row.job_id)
        if st is None:
            # a just-submitted job sacct does not know yet, or one Slurm has forgotten
            continue
        row.state, row.elapsed, row.node = st.state, st.elapsed, st.node
        row.reason, row.exit_code = st.reason, st.exit_code
    note = ""
    if result.source == "squeue":
        note = result.sacct_error or "sacct not used"
    return result.source, note


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
    return LaunchStatus(str(rdir), manifest.name, manifest.backend, source, rows, note)


# ------------------------------------------------------------------------------------------ render

_STYLE = {
    "COMPLETED": "green",
    "RUNNING": "cyan",
    "PENDING": "yellow",
    "REQUEUED": "yellow",
    "COMPLETING": "cyan",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "TIMEOUT": "red",
    "OUT_OF_MEMORY": "red",
    "NODE_FAIL": "red",
    "UNKNOWN": "dim",
}


# (header, right-aligned, max width): a fixed-width text table, not rich.table.Table, which spends
# ~0.5 s measuring and wrapping the 5,000 cells of a 500-job launch on this 2-core box (~20 ms here).
_COLUMNS = (
    ("point", True, 12),
    ("overrides", False, 40),
    ("stage", False, 10),
    ("job", False, 16),
    ("state", False, 13),
    ("elapsed", True, 11),
    ("node", False, 16),
    ("step", True, 8),
    ("loss", True, 9),
    ("reason / exit", False, 40),
)


def _cells(r: JobRow) -> list[str]:
    detail = r.reason if r.state == "PENDING" else ""
    if r.failed:
        exit_code = r.exit_code if r.exit_code not in ("", "0:0") else ""
        detail = f"exit {exit_code}" if exit_code else (r.error or r.reason)
    return [
        ",".join(str(p) for p in r.points) if r.points else "all",
        " ".join(r.overrides),
        r.stage,
        r.job_id,
        r.state,
        "" if r.state == "PENDING" else r.elapsed,
        r.node,
        "" if r.step is None else str(r.step),
        "" if r.loss is None else f"{r.loss:.4f}",
        detail,
    ]


def _fit(value: str, width: int, right: bool) -> str:
    if len(value) > width:
        value = value[: width - 1] + "…"
    return value.rjust(width) if right else value.ljust(width)


def render(status: LaunchStatus, *, max_failures: int = 5):  # -> rich.console.Group
    """Header, one line per job (state coloured), then the stderr tail of up to max_failures failed jobs."""
    from rich.console import Group
    from rich.text import Text

    counts = ", ".join(f"{n} {s}" for s, n in sorted(status.counts().items()))
    src = status.source if status.source != "squeue" else f"squeue (sacct unavailable: {status.note})"
    header = Text.assemble(
        (status.name, "bold"),
        f"  {status.run_dir}\n",
        f"backend {status.backend} · states from {src} · {len(status.rows)} jobs: {counts}",
    )
    rows = [_cells(r) for r in status.rows]
    widths = [min(cap, max([len(name), *(len(row[i]) for row in rows)])) for i, (name, _, cap) in enumerate(_COLUMNS)]
    state_col = 4
    lines = [
        Text("  ".join(_fit(n, w, right) for (n, right, _), w in zip(_COLUMNS, widths, strict=True)), style="bold"),
        Text("  ".join("─" * w for w in widths), style="dim"),
    ]
    for r, cells in zip(status.rows, rows, strict=True):
        line = Text(no_wrap=True, overflow="ellipsis")
        for i, ((_, right, _), w, cell) in enumerate(zip(_COLUMNS, widths, cells, strict=True)):
            if i:
                line.append("  ")
            line.append(_fit(cell, w, right), style=_STYLE.get(r.state, "") if i == state_col else "")
        line.rstrip()
        lines.append(line)
    table = Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
    table.no_wrap, table.overflow = True, "ellipsis"
    parts = [header, table]
    failed = [r for r in status.rows if r.failed and r.state != "CANCELLED"]
    for r in failed[:max_failures]:
        body = "\n".join(r.stderr_tail) if r.stderr_tail else (r.error or "(no stderr logged)")
        parts.append(Text(f"\n{r.stage} {r.job_id} {r.state} exit {r.exit_code or '?'} — {r.log_err}", style="red"))
        parts.append(Text(body, style="dim"))
    if len(failed) > max_failures:
        parts.append(Text(f"... and {len(failed) - max_failures} more failed jobs (--json lists all)"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptoss-hpc status",
        description="Every job of a launch: state, elapsed, node, last step/loss, pending reason, failures.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", help="run dir, or experiment name (its newest launch); default: newest launch")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5) until every job has ended, or Ctrl-C",
    )
    p.add_argument("--run-root", default=DEFAULT_RUN_ROOT, help="where launches live (default: logs)")
    p.add_argument("--no-sacct", action="store_true", help="use squeue only (no accounting)")
    return p


def _exit_for(exc: GptossHpcError) -> int:
    return 2 if isinstance(exc, LaunchNotFoundError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_dir = resolve_run_dir(args.target, args.run_root)
        if args.json and args.watch is None:
            print(json.dumps(collect(run_dir, use_sacct=not args.no_sacct).to_dict(), indent=2))
            return 0
        if args.watch is None:
            _console().print(render(collect(run_dir, use_sacct=not args.no_sacct)))
            return 0
        return _watch(run_dir, args.watch, as_json=args.json, use_sacct=not args.no_sacct)
    except GptossHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit_for(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _console():  # -> rich.console.Console
    """The terminal's width on a terminal (long lines cropped with …); whole lines into a pipe or file."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000)


def _watch(run_dir: Path, every: float, *, as_json: bool, use_sacct: bool) -> int:
    every = max(every, 0.5)
    if as_json:  # one JSON document per line, per refresh
        while True:
            st = collect(run_dir, use_sacct=use_sacct)
            print(json.dumps(st.to_dict()), flush=True)
            if st.all_terminal:
                return 0
            time.sleep(every)
    from rich.live import Live

    console = _console()
    st = collect(run_dir, use_sacct=use_sacct)
    with Live(render(st), console=console, auto_refresh=False) as live:
        while not st.all_terminal:
            time.sleep(every)
            st = collect(run_dir, use_sacct=use_sacct)
            live.update(render(st), refresh=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
