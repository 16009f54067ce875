"""Print or follow the submitit log of one job of a launch.

    python -m gptoss_hpc.logs logs/demo/20261125-081500              # train log of point 0
    python -m gptoss_hpc.logs logs/demo/20261125-081500 --point 3 --stage eval --err
    python -m gptoss_hpc.logs 1234_3 -f                              # follow array task 3 of job 1234
    python -m gptoss_hpc.logs 1234 --point 3 -f                      # same

A JOB_ID is looked up among the newest launches under --run-root. `-f` follows like `tail -f` and ends
when the job reaches a terminal state; a requeued job keeps its id and submitit's log file, so following
goes on into the new attempt (a file that is truncated or replaced is re-read from its start).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gptoss_hpc import slurm
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.monitor.cli_errors import run_cli
from gptoss_hpc.monitor.state import (
    DEFAULT_RUN_ROOT,
    JobRow,
    LaunchNotFoundError,
    collect,
    job_rows,
    load_manifest,
    newest_run_dirs,
    resolve_run_dir,
)
from gptoss_hpc.submission.manifest import Manifest

SEARCH_LAUNCHES = 50  # how many of the newest launches a JOB_ID is looked up in
_JOB_ID = re.compile(r"^(?P<job>\d+)(?:_(?P<task>\d+))?$")
GONE_AFTER_S = 15.0  # a job neither sacct nor squeue knows for this long is treated as ended


@dataclass(frozen=True)
class LogTarget:
    run_dir: Path
    manifest: Manifest
    row: JobRow  # the job or array task: stage, Slurm id ("1234_3" or "1235"), points, log paths

    @property
    def task_id(self) -> str:
        return self.row.job_id

    @property
    def stage(self) -> str:
        return self.row.stage

    @property
    def point(self) -> int | None:
        return self.row.points[0] if len(self.row.points) == 1 else None

    @property
    def out(self) -> Path:
        return Path(self.row.log_out)

    @property
    def err(self) -> Path:
        return Path(self.row.log_err)


def _pick(rows: list[JobRow], point: int | None, what: str) -> JobRow:
    if point is None:
        return rows[0]
    for row in rows:
        if point in row.points:
            return row
    have = sorted({p for r in rows for p in r.points})
    raise LaunchNotFoundError(f"point {point} is not in {what}; its points: {have}")


def find_target(target: str, *, point: int | None, stage: str, run_root: str | Path = DEFAULT_RUN_ROOT) -> LogTarget:
    """RUN_DIR (+ --stage, --point) or JOB_ID ("1234", "1234_3") → the job and its log files."""
    m = _JOB_ID.match(target)
    if m and not (Path(target) / "launch.json").is_file():
        job, task = m["job"], m["task"]
        if task is not None:
            if point is not None and point != int(task):
                raise LaunchNotFoundError(f"{target} is array task {task}, but --point {point} was given")
            point = int(task)
        for run_dir in newest_run_dirs(run_root, SEARCH_LAUNCHES):
            try:
                manifest = load_manifest(run_dir)
            except LaunchNotFoundError:
                continue
            rows = [r for r in job_rows(manifest) if r.job_id.split("_", 1)[0] == job]
            if rows:
                row = _pick(rows, point, f"job {job}")
                return LogTarget(Path(manifest.run_dir), manifest, row)
        raise LaunchNotFoundError(
            f"job {target} is not from any of the {SEARCH_LAUNCHES} newest launches under {run_root}/"
            " (pass the run dir instead, or --run-root)"
        )
    run_dir = resolve_run_dir(target, run_root)
    manifest = load_manifest(run_dir)
    rows = [r for r in job_rows(manifest) if r.stage == stage]
    if not rows:
        stages = ", ".join(dict.fromkeys(j.stage for j in manifest.jobs)) or "none"
        raise LaunchNotFoundError(f"launch {run_dir} has no {stage!r} job (its stages: {stages})")
    return LogTarget(Path(manifest.run_dir), manifest, _pick(rows, point, f"the {stage} jobs of {run_dir}"))


def job_state(t: LogTarget) -> str | None:
    """Current state of the target job (None: Slurm does not know it, yet or any more)."""
    if t.manifest.backend == "local":  # from the status files, as `status` reads them
        for row in collect(t.run_dir).rows:
            if row.stage == t.stage and row.job_id == t.task_id and row.points == t.row.points:
                return row.state
        return None
    st = slurm.query([t.task_id], tasks=[t.task_id]).get(t.task_id)
    return st.state if st else None


def follow(
    path: Path,
    state: Callable[[], str | None],
    out: TextIO,
    *,
    poll_s: float = 0.5,
    state_every_s: float = 2.0,
    gone_after_s: float = GONE_AFTER_S,
    notice: Callable[[str], None] = lambda _msg: None,
) -> str | None:
    """Stream path to out like `tail -f` until state() is terminal; returns the final state.

    Waits for a file that does not exist yet; a file that shrinks or is replaced (new inode) is read
    again from its start (a requeued attempt that truncates); an appended one just goes on.
    """
    pos = 0
    ino: int | None = None
    last_check = 0.0
    current: str | None = None
    unknown_since: float | None = None
    finishing = False
    while True:
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        if stat is not None:
            if ino is not None and (stat.st_ino != ino or stat.st_size < pos):
                notice(f"{path} was truncated or replaced (new attempt?): reading it from the start")
                pos = 0
            ino = stat.st_ino
            if stat.st_size > pos:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                pos += len(data)
                out.write(data.decode("utf-8", errors="replace"))
                out.flush()
        if finishing:
            return current
        now = time.monotonic()
        if now - last_check >= state_every_s:
            last_check = now
            current = state()
            if current is None:
                unknown_since = unknown_since or now
                if now - unknown_since >= gone_after_s:
                    notice("the job is unknown to Slurm: stopping")
                    finishing = True
                    continue
            else:
                unknown_since = None
                if current in slurm.TERMINAL_STATES:
                    finishing = True  # one last read: the job may have written after our read
                    time.sleep(min(poll_s, 0.5))
                    continue
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptoss-hpc logs",
        description="Print (or follow with -f) the log of one job of a launch.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="run dir, experiment name, or Slurm job id (1234 or 1234_3)")
    p.add_argument("--point", type=int, default=None, help="sweep point (array task); default: the first")
    p.add_argument("--stage", default="train", help="stage whose log to show (default: train)")
    p.add_argument("--err", action="store_true", help="stderr log instead of stdout")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.add_argument("--run-root", default=DEFAULT_RUN_ROOT, help="where launches live (default: logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        t = find_target(args.target, point=args.point, stage=args.stage, run_root=args.run_root)
        if not t.task_id:
            raise GptossHpcError(
                f"the {t.stage} job of point {t.point} never started (an earlier stage of that point failed)"
            )
        path = t.err if args.err else t.out
        if not args.follow:
            if not path.is_file():
                st = job_state(t)
                raise GptossHpcError(
                    f"{path} does not exist yet (job {t.task_id} is {st or 'unknown to Slurm'}); use -f to wait for it"
                )
            with open(path, "rb") as f:
                while chunk := f.read(1 << 16):
                    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
            return 0
        print(f"==> {path} ({t.stage}, job {t.task_id}) <==", file=sys.stderr, flush=True)
        final = follow(
            path,
            lambda: job_state(t),
            sys.stdout,
            notice=lambda msg: print(f"==> {msg}", file=sys.stderr, flush=True),
        )
        print(f"==> job {t.task_id} ended: {final or 'unknown'}", file=sys.stderr, flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
