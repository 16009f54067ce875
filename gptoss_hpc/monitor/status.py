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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gptoss_hpc.monitor.cli_errors import run_cli
from gptoss_hpc.monitor.records import FACT_HEADERS, fact_cells, launch_facts
from gptoss_hpc.monitor.state import (
    DEFAULT_RUN_ROOT,
    JobRow,
    LaunchStatus,
    collect,
    resolve_run_dir,
)

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
    detail = r.reason if r.state == "PENDING" else "; ".join(r.warnings)
    if r.failed:
        exit_code = r.exit_code if r.exit_code not in ("", "0:0") else ""
        detail = f"exit {exit_code}" if exit_code else (r.error or r.reason)
        if exit_code and r.error:
            detail = f"{detail}: {r.error}"
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


_FACT_COLUMNS = (("point", False, 6), ("overrides", False, 40), *((h, True, 20) for h in FACT_HEADERS))


def _table(columns, rows: list[list[str]], styles: list[dict[int, str]]):  # -> rich.text.Text
    """A fixed-width text table: a bold header, a rule, one line per row (cell i styled by styles[row][i])."""
    from rich.text import Text

    widths = [min(cap, max([len(name), *(len(row[i]) for row in rows)])) for i, (name, _, cap) in enumerate(columns)]
    lines = [
        Text("  ".join(_fit(n, w, right) for (n, right, _), w in zip(columns, widths, strict=True)), style="bold"),
        Text("  ".join("─" * w for w in widths), style="dim"),
    ]
    for cells, style in zip(rows, styles, strict=True):
        line = Text(no_wrap=True, overflow="ellipsis")
        for i, ((_, right, _), w, cell) in enumerate(zip(columns, widths, cells, strict=True)):
            if i:
                line.append("  ")
            line.append(_fit(cell, w, right), style=style.get(i, ""))
        line.rstrip()
        lines.append(line)
    table = Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
    table.no_wrap, table.overflow = True, "ellipsis"
    return table


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
    state_col = 4
    styles = [{state_col: _STYLE.get(r.state, "")} for r in status.rows]
    parts = [header, _table(_COLUMNS, [_cells(r) for r in status.rows], styles)]
    if any(any(c != "-" for c in fact_cells(p)) for p in status.points):
        parts.append(Text("\nwhat each point kept and cost (- where its records do not say):", style="bold"))
        cells = [[f"p{p['point']:03d}", " ".join(p["overrides"]), *fact_cells(p)] for p in status.points]
        parts.append(_table(_FACT_COLUMNS, cells, [{} for _ in cells]))
    for r in status.rows:
        if r.endpoint and r.state == "RUNNING":
            points = ",".join(f"p{p:03d}" for p in r.points)
            parts.append(Text(f"serve {points} ({r.job_id}): {r.endpoint}", style="cyan"))
    failed = [r for r in status.rows if r.failed and r.state != "CANCELLED"]
    for r in failed[:max_failures]:
        body = "\n".join(r.stderr_tail) if r.stderr_tail else (r.error or "(no stderr logged)")
        parts.append(Text(f"\n{r.stage} {r.job_id} {r.state} exit {r.exit_code or '?'} — {r.log_err}", style="red"))
        if r.error and r.stderr_tail:  # rank 0's exception line, which the log tail may not reach
            parts.append(Text(f"error: {r.error}", style="red"))
        parts.append(Text(body, style="dim"))
    if len(failed) > max_failures:
        parts.append(Text(f"... and {len(failed) - max_failures} more failed jobs (--json lists all)"))
    warned = [(r, w) for r in status.rows for w in r.warnings]
    if warned:
        parts.append(Text("\nwarnings (the stage went on):", style="yellow"))
        parts += [Text(f"  {r.stage} {r.job_id or '-'} point {','.join(map(str, r.points))}: {w}") for r, w in warned]
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        run_dir = resolve_run_dir(args.target, args.run_root)
        if args.json and args.watch is None:
            print(json.dumps(_collect(run_dir, not args.no_sacct).to_dict(), indent=2))
            return 0
        if args.watch is None:
            _console().print(render(_collect(run_dir, not args.no_sacct)))
            return 0
        return _watch(run_dir, args.watch, as_json=args.json, use_sacct=not args.no_sacct)

    return run_cli(body)


def _collect(run_dir: Path, use_sacct: bool) -> LaunchStatus:
    """The jobs' states, and what each point kept and cost so far."""
    status = collect(run_dir, use_sacct=use_sacct)
    status.points = launch_facts(status)
    return status


def _console():  # -> rich.console.Console
    """The terminal's width on a terminal (long lines cropped with …); whole lines into a pipe or file."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000)


def _watch(run_dir: Path, every: float, *, as_json: bool, use_sacct: bool) -> int:
    every = max(every, 0.5)
    if as_json:  # one JSON document per line, per refresh
        while True:
            st = _collect(run_dir, use_sacct)
            print(json.dumps(st.to_dict()), flush=True)
            if st.all_terminal:
                return 0
            time.sleep(every)
    from rich.live import Live

    console = _console()
    st = _collect(run_dir, use_sacct)
    with Live(render(st), console=console, auto_refresh=False) as live:
        while not st.all_terminal:
            time.sleep(every)
            st = _collect(run_dir, use_sacct)
            live.update(render(st), refresh=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
