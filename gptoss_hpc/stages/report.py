"""The sweep report: one table, loss curves and eval-vs-hyperparameter plots for every point of a launch,
with failed points marked and their error lines.

    python -m gptoss_hpc.report logs/demo/20261125-081500

Reads ``launch.json`` and, per point, ``config.yaml``, ``metrics.jsonl``, ``eval/eval.json`` and
``status/<stage>.json`` (for a stage without a status file, the tail of its log under ``slurm/<stage>/``).
Writes ``report/report.md``, ``report/report.json`` and ``report/*.png``. The report succeeds when some
points failed (it is the job that tells the user) and fails only when no point has any result.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.monitor.records import FACT_HEADERS, fact_cells, point_facts
from gptoss_hpc.monitor.state import log_tail, point_log_files, read_json, read_metrics
from gptoss_hpc.paths import PointPaths, RunPaths
from gptoss_hpc.submission.manifest import Manifest

log = logging.getLogger(__name__)

POINT_STAGES = ("train", "merge", "eval")
LOG_TAIL_LINES = 15
PLOTS = ("loss_curves.png", "eval_vs_lora_r.png", "eval_vs_learning_rate.png", "cost_per_point.png")


class ReportError(GptossHpcError):
    """Not a launch directory, or no point of the launch produced any result."""


@dataclass
class PointSummary:
    index: int
    dir: str
    overrides: list[str]
    lora_r: int | None = None
    learning_rate: float | None = None
    state: str = "ok"  # ok | failed
    stages: dict[str, str] = field(default_factory=dict)  # stage -> COMPLETED | FAILED | RUNNING | MISSING
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # "<stage>: push failed: ...", W&B fallbacks
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final_train_loss: float | None = None
    eval: dict[str, Any] | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # what the point kept and cost (monitor/records.py)

    @property
    def has_results(self) -> bool:
        return bool(self.losses) or self.eval is not None

    def metric(self, key: str, model: str = "finetuned") -> float | None:
        if not self.eval:
            return None
        value = (self.eval.get(model) or {}).get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


# --- reading ----------------------------------------------------------------------------------------


def _hyperparameters(config: Path) -> tuple[int | None, float | None, list[str]]:
    """(lora.r, train.learning_rate, stages) from a point's config.yaml, read as plain YAML."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    except Exception as exc:  # a missing or broken config is reported, not fatal
        log.warning("cannot read %s: %s", config, exc)
        return None, None, list(POINT_STAGES)
    assert isinstance(raw, dict)
    r = (raw.get("lora") or {}).get("r")
    lr = (raw.get("train") or {}).get("learning_rate")
    stages = [s for s in raw.get("stages") or POINT_STAGES if s in POINT_STAGES]
    return (
        int(r) if isinstance(r, int | float) else None,
        float(lr) if isinstance(lr, int | float) else None,
        stages,
    )


def summarize_point(run: RunPaths, manifest: Manifest, record: Any) -> PointSummary:
    paths = PointPaths(run.root / record.dir)
    r, lr, stages = _hyperparameters(paths.config)
    summary = PointSummary(
        index=record.index, dir=record.dir, overrides=list(record.overrides), lora_r=r, learning_rate=lr
    )
    summary.steps, summary.losses = read_metrics(paths.metrics)
    summary.final_train_loss = summary.losses[-1] if summary.losses else None
    summary.eval = read_json(paths.eval / "eval.json")
    summary.facts = point_facts(paths, full_metrics=True)
    for stage in stages:
        status = read_json(paths.stage_status(stage))
        state = str(status.get("state", "UNKNOWN")) if status else "MISSING"
        summary.stages[stage] = state
        summary.warnings += [f"{stage}: {w}" for w in (status or {}).get("warnings") or []]
        if state == "COMPLETED":
            continue
        summary.state = "failed"
        if state == "FAILED":
            error = (status or {}).get("error") or "failed (no error line recorded)"
            summary.errors.append(f"{stage}: {error}")
            continue
        tail = log_tail(point_log_files(run, manifest.job(stage), stage, record.index), LOG_TAIL_LINES)
        if state == "MISSING" and any(summary.stages.get(s) == "FAILED" for s in stages):
            summary.errors.append(f"{stage}: did not run (an earlier stage failed)")
        elif state == "MISSING":
            summary.errors.append(f"{stage}: no status file (job never started, was cancelled, or died at start)")
        else:
            summary.errors.append(f"{stage}: status {state} but the job is over (killed: time limit, OOM, node?)")
        summary.errors.extend(f"    {line}" for line in tail)
    if summary.state == "ok" and summary.eval is None and "eval" in stages:
        summary.state = "failed"
        summary.errors.append("eval: COMPLETED but eval/eval.json is missing")
    return summary


# --- writing ----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def plot_all(points: Sequence[PointSummary], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        if p.losses:
            ax.plot(p.steps, p.losses, marker=".", label=f"{p.dir} r={_fmt(p.lora_r)} lr={_fmt(p.learning_rate)}")
    if any(p.losses for p in points):
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss per sweep point")
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=100)
    plt.close(fig)
    written.append(out / PLOTS[0])

    for name, attr, xlabel, logx in (
        (PLOTS[1], "lora_r", "lora.r", True),
        (PLOTS[2], "learning_rate", "train.learning_rate", True),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, ylabel in (
            (axes[0], "loss", "held-out loss (fine-tuned)"),
            (axes[1], "language_adherence", "reasoning-language adherence"),
        ):
            xs, ys, labels = [], [], []
            for p in points:
                x, y = getattr(p, attr), p.metric(key)
                if x is not None and y is not None:
                    xs.append(x)
                    ys.append(y)
                    labels.append(p.dir)
            if xs:
                ax.scatter(xs, ys)
                for x, y, label in zip(xs, ys, labels, strict=True):
                    ax.annotate(label, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
                if logx and min(xs) > 0:
                    ax.set_xscale("log")
            else:
                ax.text(0.5, 0.5, "no eval results", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel=xlabel, ylabel=ylabel)
            if key == "language_adherence":
                ax.set_ylim(-0.05, 1.05)
        fig.suptitle(f"Eval against {xlabel}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    written.append(_plot_cost(points, out / PLOTS[3]))
    return written


def _plot_cost(points: Sequence[PointSummary], path: Path) -> Path:
    """Steady tok/s and peak GPU GiB per point, side by side: a sweep's cost at a glance."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ylabel in ((axes[0], "tok_s", "steady tok/s"), (axes[1], "peak_gib", "peak GPU GiB allocated")):
        shown = [(p.dir, p.facts[key]) for p in points if p.facts.get(key) is not None]
        if shown:
            ax.bar([d for d, _ in shown], [v for _, v in shown])
            ax.tick_params(axis="x", labelrotation=45, labelsize="small")
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(ylabel=ylabel)
    fig.suptitle("What each point cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_markdown(manifest: Manifest, points: Sequence[PointSummary], best: PointSummary | None) -> str:
    ok = sum(p.state == "ok" for p in points)
    lines = [
        f"# Sweep report: {manifest.name}",
        "",
        f"- Run dir: `{manifest.run_dir}` ({manifest.backend}, created {manifest.created})",
        f"- Points: {len(points)}, ok: {ok}, failed: {len(points) - ok}",
    ]
    if best is not None:
        lines.append(
            f"- Best held-out loss: **{best.dir}** ({' '.join(best.overrides) or 'no overrides'}): "
            f"{_fmt(best.metric('loss'))} (base model {_fmt(best.metric('loss', 'base'))})"
        )
    lines += [
        "",
        "| point | overrides | lora.r | learning_rate | state | stages | final train loss | base eval loss "
        "| fine-tuned eval loss | perplexity | format validity | adherence |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        stages = ", ".join(f"{s}:{st}" for s, st in p.stages.items())
        lines.append(
            f"| {p.dir} | {' '.join(p.overrides) or '-'} | {_fmt(p.lora_r)} | {_fmt(p.learning_rate)} | "
            f"{'ok' if p.state == 'ok' else '**FAILED**'} | {stages} | {_fmt(p.final_train_loss)} | "
            f"{_fmt(p.metric('loss', 'base'))} | {_fmt(p.metric('loss'))} | {_fmt(p.metric('perplexity'))} | "
            f"{_fmt(p.metric('format_validity'))} | {_fmt(p.metric('language_adherence'))} |"
        )
    lines += [
        "",
        "## What each point kept and cost",
        "",
        "Rows trained / dropped / truncated by the data pass (data.json), tokens trained (non-padding, all ranks), "
        "steady tok/s and MFU (median over the logged steps shown, after the warm-up; MFU on rank 0's GPU), peak GPU "
        "GiB allocated (reserved), GPU-hours of the train stage.",
        "",
        f"| point | overrides | {' | '.join(FACT_HEADERS)} | steady steps |",
        "|---" * (len(FACT_HEADERS) + 3) + "|",
    ]
    for p in points:
        cells = " | ".join(fact_cells(p.facts))
        lines.append(f"| {p.dir} | {' '.join(p.overrides) or '-'} | {cells} | {p.facts.get('steady_steps') or '-'} |")
    failed = [p for p in points if p.state != "ok"]
    if failed:
        lines += ["", "## Failed points", ""]
        for p in failed:
            lines += [f"### {p.dir} ({' '.join(p.overrides) or 'no overrides'})", "", "```", *p.errors, "```", ""]
    warned = [p for p in points if p.warnings]
    if warned:
        lines += ["", "## Warnings (the stages went on)", ""]
        lines += [f"- {p.dir}: {w}" for p in warned for w in p.warnings]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in PLOTS]
    lines.append("")
    return "\n".join(lines)


def best_point(points: Sequence[PointSummary]) -> PointSummary | None:
    """The point with the lowest held-out loss (the fine-tuned model's eval loss), None when none has one."""
    scored = [p for p in points if p.metric("loss") is not None]
    return min(scored, key=lambda p: p.metric("loss") or 0.0) if scored else None


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    run = RunPaths(Path(run_dir).resolve())
    try:
        manifest = Manifest.load(run.root)
    except GptossHpcError as exc:
        raise ReportError(str(exc)) from exc
    points = [summarize_point(run, manifest, record) for record in sorted(manifest.points, key=lambda r: r.index)]
    best = best_point(points)

    run.report.mkdir(parents=True, exist_ok=True)
    plot_all(points, run.report)
    report = {
        "name": manifest.name,
        "run_dir": str(run.root),
        "created": manifest.created,
        "backend": manifest.backend,
        "points_total": len(points),
        "points_ok": sum(p.state == "ok" for p in points),
        "points_failed": sum(p.state != "ok" for p in points),
        "best_point": best.dir if best else None,
        "plots": list(PLOTS),
        "points": [asdict(p) for p in points],
    }
    write_atomic(run.report / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(run.report / "report.md", render_markdown(manifest, points, best))
    log.info("report written to %s (%d ok, %d failed)", run.report, report["points_ok"], report["points_failed"])
    if not any(p.has_results for p in points):
        raise ReportError(
            f"no point of {run.root} has any result (no metrics.jsonl rows, no eval/eval.json); "
            f"see {run.report / 'report.md'} for each point's errors"
        )
    return run.report / "report.md"


def main(run_dir: str | os.PathLike[str]) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build_report(run_dir)


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m gptoss_hpc.report RUN_DIR` / `gptoss-hpc report RUN_DIR`: exit 1 only when no point has a result."""
    parser = argparse.ArgumentParser(prog="python -m gptoss_hpc.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a launch directory (holds launch.json)")
    args = parser.parse_args(argv)
    try:
        path = main(args.run_dir)
    except GptossHpcError as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
