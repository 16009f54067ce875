"""What each point of a launch kept and cost, read from its records: `status` and the report show the same facts.

Per point (``pNNN/``):
- ``data.json``: what the train stage loaded, the keys of ``gptoss_hpc.data.load.load_data``'s ``stats`` (rows_read,
  bad_rows_skipped, over_max_length, dropped_too_long, truncated, dropped_prompt_too_long, tokens_dropped,
  tokens_truncated, train_rows, eval_rows, max_length, max_length_policy ...), by ``write_data_record`` (a writer's
  keys update the file's).
- ``data_lengths.json``: what the launch measured of the rows before submitting (gptoss_hpc.config.lengths: row
  tokens p50/p90/p99/max, the max_length it chose, rows and tokens over it).
- ``train_metrics.json``: ``tokens`` (TRL's num_input_tokens_seen: non-padding tokens over all ranks), and from the
  train stage's run facts (stages/run_facts.py) steady tok/s and MFU, peak GiB and the GPUs it used.
- ``metrics.jsonl``: per logging step ``time``, ``num_input_tokens_seen`` and ``useful_flops``; a running point's
  tok/s comes from here.
- ``status/train.json``: ``wall_s`` and ``peak_gpu_gib`` of the stage (records older than the run facts have these).

Missing files or fields give None (shown as "-"): run dirs written before any of this still show.

Steady rate, defined once here: the median, over consecutive logged steps from ``STEADY_WARMUP_STEPS`` on, of
(change of a cumulative counter) / (change of wall time). The first steps compile; the median leaves out a stall
(a checkpoint save, a recompile) that a mean would carry.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.monitor.state import LaunchStatus, read_json, tail_lines
from gptoss_hpc.paths import PointPaths, RunPaths

# Optimizer steps left out before the steady state: as many as torch.compile may still compile in
# (gptoss_hpc.modeling.trainer.RECOMPILE_WARMUP_STEPS).
STEADY_WARMUP_STEPS = 4
# metrics.jsonl lines `status` reads for a running point's rate (the file's tail only: status stays fast)
LIVE_TAIL_LINES = 20
# rows that never trained: too long under data.max_length_policy, or bad rows skipped under data.skip_bad_rows
DROPPED_KEYS = ("dropped_too_long", "dropped_prompt_too_long", "bad_rows_skipped")

FACT_HEADERS = ("length", "rows trained", "dropped", "truncated", "tokens", "tok/s", "MFU", "peak GiB", "GPU-h")


# ------------------------------------------------------------------------------------------ writing


def write_data_record(paths: PointPaths, stats: Mapping[str, Any]) -> Path:
    """Record a data pass's counts in the point's data.json (its keys update the ones already there)."""
    record = read_json(paths.data_record) or {}
    record.update(stats)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.data_record, json.dumps(record, indent=2, default=str) + "\n")
    return paths.data_record


# ------------------------------------------------------------------------------------------ reading


def metric_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl lines that carry a step and a time (a torn line is skipped)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float) and isinstance(row.get("time"), float):
            rows.append(row)
    return rows


def steady_rate(
    rows: Sequence[Mapping[str, Any]], key: str, warmup_steps: int = STEADY_WARMUP_STEPS
) -> tuple[float | None, str | None]:
    """(median per-second rate of the cumulative ``key`` over steady logged steps, "first-last" steps used).

    Steady means from step ``warmup_steps`` on; a run too short for that starts at its middle logged step. Intervals
    where the counter or the step did not grow are skipped (a resumed run's counters restart with its process)."""
    pts = [(int(r["step"]), float(r["time"]), float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    if len(pts) < 2:
        return None, None
    start = min(warmup_steps, pts[(len(pts) - 1) // 2][0])
    steady = [p for p in pts if p[0] >= start]
    rates = [(b[2] - a[2]) / (b[1] - a[1]) for a, b in pairwise(steady) if b[0] > a[0] and b[1] > a[1] and b[2] > a[2]]
    if not rates:
        return None, None
    return statistics.median(rates), f"{steady[0][0]}-{steady[-1][0]}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def facts(
    data: Mapping[str, Any] | None,
    train_metrics: Mapping[str, Any] | None,
    train_status: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]] = (),
    lengths: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A point's facts from its records (any of them may be None); see the module docstring."""
    data, tm, st, measured = data or {}, train_metrics or {}, train_status or {}, lengths or {}
    dropped = [data[k] for k in DROPPED_KEYS if isinstance(data.get(k), int)]
    tok_s, steps = _num(tm.get("steady_tok_s")), tm.get("steady_steps")
    if tok_s is None:  # a running point, or one trained before the stage recorded it
        tok_s, steps = steady_rate(rows, "num_input_tokens_seen")
    tokens = tm.get("tokens")
    if tokens is None and rows:
        tokens = rows[-1].get("num_input_tokens_seen")
    peak = _num(tm.get("peak_gpu_gib"))
    peak = _num(st.get("peak_gpu_gib")) if peak is None else peak
    wall, gpus = _num(st.get("wall_s")), _num(tm.get("gpus"))
    return {
        "rows_trained": data.get("train_rows", tm.get("train_rows")),
        "rows_dropped": sum(dropped) if dropped else None,
        "rows_truncated": data.get("truncated"),
        "tokens_trained": tokens,
        "tok_s": tok_s,
        "steady_steps": steps,
        "mfu": _num(tm.get("steady_mfu")),
        "peak_gib": peak,
        "peak_reserved_gib": _num(tm.get("peak_gpu_reserved_gib")),
        "gpus": tm.get("gpus"),
        "wall_s": wall,
        "gpu_hours": None if wall is None or gpus is None or st.get("state") != "COMPLETED" else wall * gpus / 3600,
        "max_length": data.get("max_length", measured.get("max_length")),
        "max_length_policy": data.get("max_length_policy", measured.get("policy")),
        "tokens_dropped": data.get("tokens_dropped"),
        "tokens_truncated": data.get("tokens_truncated"),
        "row_tokens_p50": measured.get("p50"),
        "row_tokens_max": measured.get("max"),
    }


def point_facts(point: PointPaths, *, full_metrics: bool = False) -> dict[str, Any]:
    """The facts of one point from its files; metrics.jsonl's tail only unless ``full_metrics`` (the report), and
    none of it when train_metrics.json holds the steady rate already (a 500-point sweep's status stays fast)."""
    train_metrics = read_json(point.train_metrics)
    lines: list[str] = []
    if full_metrics and point.metrics.is_file():
        lines = point.metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    elif (train_metrics or {}).get("steady_tok_s") is None:
        lines = tail_lines(point.metrics, LIVE_TAIL_LINES)
    status, lengths = read_json(point.stage_status("train")), read_json(point.data_lengths)
    return facts(read_json(point.data_record), train_metrics, status, metric_rows(lines), lengths)


# ---------------------------------------------------------------------------------------- formatting


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "-"


def fact_cells(f: Mapping[str, Any]) -> list[str]:
    """The FACT_HEADERS cells of one point's facts ("-" for what its records do not hold)."""
    peak = "-" if f.get("peak_gib") is None else f"{f['peak_gib']:.1f}"
    if f.get("peak_reserved_gib") is not None:
        peak += f" ({f['peak_reserved_gib']:.1f} res.)"
    return [
        _count(f.get("max_length")),
        _count(f.get("rows_trained")),
        _count(f.get("rows_dropped")),
        _count(f.get("rows_truncated")),
        _count(f.get("tokens_trained")),
        "-" if f.get("tok_s") is None else f"{f['tok_s']:,.0f}",
        "-" if f.get("mfu") is None else f"{f['mfu']:.3f}",
        peak,
        "-" if f.get("gpu_hours") is None else f"{f['gpu_hours']:.3g}",
    ]


def launch_facts(status: LaunchStatus) -> list[dict[str, Any]]:
    """{"point", "overrides", **facts} for every point the launch trains (one per train job / array task)."""
    run = RunPaths(Path(status.run_dir))
    return [
        {"point": r.points[0], "overrides": r.overrides, **point_facts(run.point(r.points[0]))}
        for r in status.rows
        if r.stage == "train" and len(r.points) == 1
    ]
