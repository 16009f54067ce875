"""The chaos soak's verdict, read from real state after the sweep: sacct/squeue (every attempt of every job),
`status`'s own collection (gptoss_hpc.monitor.state), the job logs, metrics.jsonl, the checkpoints, the
adapters and the report on disk. One table; `passed` only when every line of it holds."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from gptoss_hpc.bench.chaos_faults import Injection, checkpoints, job_pids, loads
from gptoss_hpc.bench.chaos_plan import FAILING_KINDS, Plan
from gptoss_hpc.monitor.state import collect, read_json, read_metrics
from gptoss_hpc.paths import PointPaths, RunPaths
from gptoss_hpc.submission import slurm
from gptoss_hpc.submission.manifest import Manifest

# the train stage's "resuming from <dir>/checkpoint-N" (not a warning that ends "resuming from ... instead")
_RESUME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*resuming from \S*checkpoint-(\d+)\s*$")
_NAN = re.compile(r"loss became (?:NaN|nan|inf|non-finite)\S* at step (\d+)")
REQUEUEING = ("preempt", "ckpt_truncate")  # faults whose point runs again under the same job id


@dataclass
class FaultRow:
    kind: str
    point: str
    caused: bool
    handled: bool
    detail: str


@dataclass
class PointRow:
    point: int
    expected: str
    state: str
    reason: str
    attempts: int
    expected_attempts: int
    resumes: list[str] = field(default_factory=list)  # "ckpt 15 -> step 16 ok"
    results: str = ""  # "" when nothing is lost, else what is

    @property
    def ok(self) -> bool:
        return (
            self.state == self.expected
            and self.attempts == self.expected_attempts
            and all(r.endswith(" ok") for r in self.resumes)
            and not self.results
        )


@dataclass
class Outcome:
    seed: int
    run_dir: str
    faults: list[FaultRow]
    points: list[PointRow]
    checks: dict[str, str]  # name -> "" (holds) or what is wrong
    errors: list[str]

    @property
    def passed(self) -> bool:
        return (
            not self.errors
            and all(f.caused and f.handled for f in self.faults)
            and all(p.ok for p in self.points)
            and not any(self.checks.values())
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def table(self) -> str:
        lines = [f"chaos soak, seed {self.seed}: {self.run_dir}", "", "fault          point  caused handled  detail"]
        for f in self.faults:
            lines.append(f"{f.kind:<14} {f.point:<6} {_yn(f.caused):<6} {_yn(f.handled):<8} {f.detail}")
        lines += ["", "point expected  final      attempts  resumed (checkpoint -> first step)   reason / lost"]
        for p in self.points:
            resumed = "; ".join(p.resumes) or "-"
            att = f"{p.attempts}/{p.expected_attempts}"
            tail = p.results or p.reason
            lines.append(f"p{p.point:03d}  {p.expected:<9} {p.state:<10} {att:<9} {resumed:<36} {tail}")
        lines.append("")
        for name, problem in self.checks.items():
            lines.append(f"{name:<34} {'ok' if not problem else 'FAIL: ' + problem}")
        lines += [f"error: {e}" for e in self.errors]
        wrong = sum(not p.ok for p in self.points)
        handled = sum(f.caused and f.handled for f in self.faults)
        kinds = len({f.kind for f in self.faults if f.caused})
        lines.append(
            f"SUMMARY seed={self.seed} kinds={kinds} faults handled={handled}/{len(self.faults)} "
            f"points wrong={wrong} lost={self.lost} -> {'PASS' if self.passed else 'FAIL'}"
        )
        return "\n".join(lines)

    @property
    def lost(self) -> int:
        return sum(bool(p.results) for p in self.points)

    @staticmethod
    def summary(outcomes: list[Outcome]) -> str:
        rows = ["seed  kinds  faults handled  points wrong  lost  report  orphans  duplicates  verdict"]
        for o in outcomes:
            handled = sum(f.caused and f.handled for f in o.faults)
            kinds = len({f.kind for f in o.faults if f.caused})
            report, orphans, twice = (
                _yn(not o.checks[k]) for k in ("report built", "no orphaned job or process", "no job submitted twice")
            )
            rows.append(
                f"{o.seed:<5} {kinds:<6} {handled}/{len(o.faults):<13} {sum(not p.ok for p in o.points):<13} "
                f"{o.lost:<5} {report:<7} {orphans:<8} {twice:<11} {'PASS' if o.passed else 'FAIL'}"
            )
        return "\n".join(rows)


def _yn(flag: bool) -> str:
    return "yes" if flag else "NO"


# ------------------------------------------------------------------------------------------- readers
def resumes(log: Path, metrics: Path) -> list[tuple[int, int | None]]:
    """(checkpoint step, first step logged after it) for each "resuming from .../checkpoint-N" in a task's
    log: the first metrics.jsonl line written after the log line's time is the resumed run's first step."""
    if not log.is_file():
        return []
    records = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and "time" in rec:
            records.append((float(rec["time"]), int(rec["step"])))
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = _RESUME.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            first = next((step for t, step in records if t > at), None)
            out.append((int(m.group(2)), first))
    return out


def fresh_starts(steps: list[int], save_steps: int) -> list[str]:
    """A rerun that logged step 1 again started from nothing: right only if the run before it never got past
    its first save (logged <= save_steps steps), else a checkpoint was there and was not used."""
    out = []
    for i in range(1, len(steps)):
        if steps[i] == 1 and steps[i - 1] >= 1:
            before = max(steps[:i])
            out.append(f"none (killed at step {before}) {'ok' if before <= save_steps else 'WRONG'}")
    return out


def _lost(point: PointPaths, expected: str, plan: Plan, steps: list[int], truncated: set[str]) -> str:
    problems = []
    kept = [d for _, d in checkpoints(point) if str(d) not in truncated]
    if steps and max(steps) > plan.save_steps and not any(not loads(d) for d in kept):
        problems.append("no loadable checkpoint left")
    if expected == "COMPLETED":
        metrics = read_json(point.train_metrics) or {}
        if metrics.get("global_step") != plan.max_steps:
            problems.append(f"train_metrics global_step {metrics.get('global_step')} != {plan.max_steps}")
        if set(range(1, plan.max_steps + 1)) - set(steps):
            problems.append(f"steps never logged: {sorted(set(range(1, plan.max_steps + 1)) - set(steps))[:5]}")
        adapter = point.adapter / "adapter_model.safetensors"
        try:
            from safetensors import safe_open

            with safe_open(str(adapter), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
        except Exception as exc:  # a missing or torn adapter is the finding
            problems.append(f"adapter does not load: {type(exc).__name__}")
    return "; ".join(problems)


# -------------------------------------------------------------------------------------------- verify
def verify(
    plan: Plan, run_dir: Path, manifest: Manifest, done: list[Injection], errors: list[str], *, since: float
) -> Outcome:
    run = RunPaths(run_dir)
    status = collect(run_dir)  # what `gptoss-hpc status` shows, after every fault (and controller restart)
    rows = {r.points[0]: r for r in status.rows if r.stage == "train"}
    runs: dict[str, int] = {}
    for attempt in slurm.attempts([j.job_id for j in manifest.jobs]):
        runs[attempt.job_id] = runs.get(attempt.job_id, 0) + 1
    caused = {(i.kind, i.point): i for i in done}
    truncated = {str(i.facts["dir"]) for i in done if i.kind == "ckpt_truncate"}

    points = []
    for p in range(plan.points):
        hits = [i for i in done if p in i.affected]
        failing = [i for i in hits if i.kind in FAILING_KINDS]
        nan = [f for f in plan.for_point(p) if f.kind == "nan"]
        expected = "FAILED" if failing or nan else "COMPLETED"
        requeues = sum(i.kind in REQUEUEING or i.kind == "node_kill" for i in hits)
        row = rows[p]
        point = run.point(p)
        steps, _ = read_metrics(point.metrics)
        log = Path(row.log_err)
        resumed = [
            f"ckpt {ckpt} -> step {first} {'ok' if first == ckpt + 1 else 'WRONG'}"
            for ckpt, first in resumes(log, point.metrics)
        ] + fresh_starts(steps, plan.save_steps)
        said = [ln.strip() for ln in row.stderr_tail if "error:" in ln]  # srun's "task 0: Killed" ...
        reason = row.error or (said[-1] if said else f"exit {row.exit_code}" if row.failed else "")
        points.append(
            PointRow(p, expected, row.state, reason[:90], runs.get(row.job_id, 0), 1 + requeues, resumed,
                     _lost(point, expected, plan, steps, truncated))
        )  # fmt: skip

    fault_rows = [_fault_row(plan, f, caused, points, run) for f in plan.faults]
    checks = {
        "report built": _report_problem(run, status, points),
        "no orphaned job or process": _orphans(manifest),
        "no job submitted twice": _duplicates(manifest, since),
        "no checkpoint or result lost": "; ".join(f"p{p.point:03d}: {p.results}" for p in points if p.results),
    }
    return Outcome(plan.seed, str(run_dir), fault_rows, points, checks, list(errors))


def _fault_row(plan: Plan, f, caused: dict, points: list[PointRow], run: RunPaths) -> FaultRow:
    label = "-" if f.point is None else f"p{f.point:03d}"
    if f.kind == "nan":  # caused at launch, by the test hook; it shows as the loss itself in metrics.jsonl
        row = points[f.point]
        _, losses = read_metrics(run.point(f.point).metrics)
        bad = [x for x in losses if x != x or x in (float("inf"), float("-inf"))]
        m = _NAN.search(row.reason)
        stopped = int(m.group(1)) if m else None
        handled = row.state == "FAILED" and stopped is not None and f.at_step <= stopped <= f.at_step + 2
        detail = f"{plan_env(f)}; non-finite losses logged: {len(bad)}; reason: {row.reason[:60] or '-'}"
        return FaultRow(f.kind, label, bool(bad) or m is not None, handled, detail)
    inj = caused.get((f.kind, f.point))
    if inj is None:
        return FaultRow(f.kind, label, False, False, "not caused (see errors)")
    touched = [points[p] for p in inj.affected]
    handled = all(p.ok for p in touched)
    if f.kind == "ckpt_truncate":
        row = points[f.point]
        step = inj.facts["truncated_step"]
        warned = any(re.search(rf"checkpoint-{step}\b", w) for w in _warnings(run, f.point))
        older = all(int(r.split()[1]) < step for r in row.resumes) and bool(row.resumes)
        handled = handled and warned and older
        inj.detail += f"; resumed below it: {_yn(older)}; warning names it: {_yn(warned)}"
    if f.kind == "ctld_restart":
        handled = all(p.state in slurm.TERMINAL_STATES for p in points) and all(
            p.attempts == p.expected_attempts for p in points
        )
        inj.detail += "; every task ran, none re-run by the restart" if handled else "; tasks lost or re-run"
    if f.kind == "node_kill":
        inj.detail += f"; points hit {[f'p{p:03d}' for p in inj.affected]}"
    return FaultRow(f.kind, label, True, handled, inj.detail)


def plan_env(f) -> str:
    return f"GPTOSS_HPC_TEST_NAN_AT=0:{f.at_step}:p{f.point:03d}"


def _warnings(run: RunPaths, point: int) -> list[str]:
    return [str(w) for w in (read_json(run.point(point).stage_status("train")) or {}).get("warnings") or []]


def _report_problem(run: RunPaths, status, points: list[PointRow]) -> str:
    report = [r for r in status.rows if r.stage == "report"]
    if not report or report[0].state != "COMPLETED":
        return f"report job {report[0].state if report else 'missing'}"
    md = run.report / "report.md"
    if not md.is_file():
        return f"{md} missing"
    text = md.read_text()
    wrong = []
    for p in points:
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| p{p.point:03d} ")), "")
        if ("| ok |" in line) != (p.expected == "COMPLETED"):
            wrong.append(f"p{p.point:03d}")
    return f"report rows wrong for {wrong}" if wrong else ""


def _orphans(manifest: Manifest) -> str:
    ids = [j.job_id for j in manifest.jobs]
    live = {t: s.state for t, s in slurm.squeue(ids).items() if not s.terminal}
    pids = job_pids(set(ids))
    problems = [f"jobs still listed: {live}"] if live else []
    problems += [f"processes left: {pids}"] if pids else []
    return "; ".join(problems)


def _duplicates(manifest: Manifest, since: float) -> str:
    """Jobs of the cluster since the launch began that carry one of the launch's job names (a retried sbatch
    whose first try did create its job would leave one) but are not the ones launch.json records. The names
    hold the experiment name (chaos<seed>), so an earlier soak's jobs, listed by sacct -S while they end, differ."""
    expected = {j.job_id for j in manifest.jobs}
    names = {a.name for a in slurm.attempts(expected)}
    start = datetime.fromtimestamp(since - 5).strftime("%Y-%m-%dT%H:%M:%S")
    extra = {a.job_id.split("_", 1)[0] for a in slurm.attempts(since=start) if a.name in names} - expected
    return f"jobs named like the launch's {sorted(expected)} besides them: {sorted(extra)}" if extra else ""
