"""Cancel every job of one launch, and only those (the ids come from its launch.json).

    python -m gptoss_hpc.cancel logs/demo/20261125-081500
    python -m gptoss_hpc.cancel demo          # the newest launch of experiment "demo"

Array jobs are cancelled by their array job id (all their unfinished tasks); finished jobs are left alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gptoss_hpc import slurm
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.monitor.cli_errors import cli_exit_status
from gptoss_hpc.monitor.state import DEFAULT_RUN_ROOT, JobRow, collect, resolve_run_dir


@dataclass
class CancelResult:
    run_dir: str
    cancelled: list[JobRow]  # the unfinished jobs (tasks) scancel was asked to end
    already_ended: int
    job_ids: list[str]  # the ids passed to scancel (array job ids end all their unfinished tasks)


def cancel_launch(run_dir: str, *, use_sacct: bool = True) -> CancelResult:
    """scancel the launch's jobs that have unfinished tasks (or that Slurm does not report yet)."""
    status = collect(run_dir, use_sacct=use_sacct)
    if status.backend != "slurm":
        raise GptossHpcError(
            f"cancel handles Slurm launches; {status.run_dir} ran on the {status.backend!r} backend"
            " (its jobs are processes of the launching shell: stop them there)"
        )
    active = [r for r in status.rows if not r.terminal]
    ids = sorted({r.job_id.split("_", 1)[0] for r in active}, key=int)
    slurm.scancel(ids)
    return CancelResult(status.run_dir, active, len(status.rows) - len(active), ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptoss-hpc cancel",
        description="Cancel every unfinished job of one launch (and nothing else).",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="run dir, or experiment name (its newest launch)")
    p.add_argument("--run-root", default=DEFAULT_RUN_ROOT, help="where launches live (default: logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = cancel_launch(str(resolve_run_dir(args.target, args.run_root)))
    except GptossHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli_exit_status(exc)
    if not res.cancelled:
        print(f"nothing to cancel in {res.run_dir}: all {res.already_ended} jobs have ended")
        return 0
    print(f"cancelled {len(res.cancelled)} job(s) of {res.run_dir} (scancel {' '.join(res.job_ids)}):")
    for r in res.cancelled:
        point = ",".join(map(str, r.points)) if r.points else "all"
        print(f"  {r.job_id:<14} {r.stage:<8} point {point:<6} was {r.state}")
    if res.already_ended:
        print(f"{res.already_ended} job(s) had already ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
