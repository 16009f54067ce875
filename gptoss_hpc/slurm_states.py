"""What Slurm says about jobs, read from sacct / squeue output (pure: no command runs here, see gptoss_hpc.slurm).

Job steps (`123.batch`, `123.extern`, `123.0`) are skipped; pending arrays that Slurm prints grouped
(`123_[0-3,7%2]`) are expanded into one entry per task (`123_0` ... `123_3`, `123_7`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "NodeList", "JobName")

# States after which a job never runs again (PREEMPTED/NODE_FAIL jobs that Slurm requeues come back as
# PENDING/REQUEUED under the same id, and sacct then shows the newest attempt).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
# squeue prints "None" or a bare placeholder when there is no reason worth showing.
NO_REASON = frozenset({"", "None", "(null)", "n/a"})
_GROUPED = re.compile(r"^(?P<base>\d+)_\[(?P<ranges>[^\]]+)\]$")


@dataclass(frozen=True)
class JobState:
    """One job or array task as Slurm reports it. `job_id` is "123" or "123_4" (array task)."""

    job_id: str
    state: str  # RUNNING, PENDING, COMPLETED, FAILED, CANCELLED, ... ("CANCELLED by 0" → "CANCELLED")
    exit_code: str = ""  # sacct's "<code>:<signal>", e.g. "1:0"; "" from squeue
    elapsed: str = ""
    node: str = ""
    reason: str = ""  # pending/failure reason from squeue (Dependency, Resources, Priority, ...)
    name: str = ""
    source: str = ""  # "sacct" | "squeue"
    grouped: bool = False  # expanded from a sacct range line (123_[0-3]): a stale summary, see parse_sacct

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class QueryResult:
    """States by task id, and where they came from ("sacct", or "squeue" when accounting is unavailable)."""

    states: dict[str, JobState]
    source: str
    sacct_error: str = ""  # why sacct was not used, when it was not

    def get(self, task_id: str) -> JobState | None:
        """The state of "123_4", else that of its array's record "123" (sacct lists an array it has not
        split into tasks yet, e.g. one cancelled while pending, under the bare array job id)."""
        if task_id in self.states:
            return self.states[task_id]
        base = task_id.split("_", 1)[0]
        if base == task_id or any(k.startswith(f"{base}_") for k in self.states):
            return None
        return self.states.get(base)


# --------------------------------------------------------------------------------------------- parsing


def expand_task_ids(job_id: str) -> list[str]:
    """`123_[0-3,7%2]` → [123_0, 123_1, 123_2, 123_3, 123_7]; any other id → [id]."""
    m = _GROUPED.match(job_id)
    if not m:
        return [job_id]
    ranges = m["ranges"].split("%", 1)[0]
    out: list[str] = []
    for part in ranges.split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        step = 1
        if ":" in hi:  # Slurm also accepts 0-15:4 (step)
            hi, step_s = hi.split(":", 1)
            step = int(step_s)
        out.extend(f"{m['base']}_{i}" for i in range(int(lo), int(hi or lo) + 1, step))
    return out


def normalize_state(raw: str) -> str:
    """`CANCELLED by 0` → `CANCELLED`; `COMPLETED+` (sacct truncation marker) → `COMPLETED`."""
    return raw.strip().split(" ", 1)[0].rstrip("+") or "UNKNOWN"


def _clean(value: str) -> str:
    value = value.strip()
    return "" if value in NO_REASON or value == "None assigned" else value


def parse_sacct(text: str) -> dict[str, JobState]:
    """Parse `sacct --parsable2 --noheader --format=JobID,State,ExitCode,Elapsed,NodeList,JobName`.

    A range line (`380_[0-2]|CANCELLED`) is the array's meta record: sacct keeps printing the range it
    was submitted with after some tasks were split off and ran (seen on 22.05: `380_0|COMPLETED` and
    `380_[0-2]|CANCELLED` side by side when only task 2 was cancelled), and lists running tasks late.
    So a task's own line always wins over a range line, and range states are marked `grouped`.
    """
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", len(SACCT_FIELDS) - 1)
        if len(fields) < len(SACCT_FIELDS):
            log.debug("skipping unparsable sacct line %r", line)
            continue
        job_id, state, exit_code, elapsed, node, name = fields
        if "." in job_id:  # steps: 123.batch, 123.extern, 123.0
            continue
        st = normalize_state(state)
        tasks = expand_task_ids(job_id)
        grouped = len(tasks) > 1 or tasks[0] != job_id
        for task in tasks:
            if grouped and task in states and not states[task].grouped:
                continue
            states[task] = JobState(
                job_id=task,
                state=st,
                exit_code=exit_code.strip(),
                elapsed=elapsed.strip(),
                node=_clean(node),
                name=name.strip(),
                source="sacct",
                grouped=grouped,
            )
    return states


def parse_squeue(text: str) -> dict[str, JobState]:
    """Parse `squeue -h -r --states=all -o '%i|%T|%r|%M|%N|%j'`."""
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 5)
        if len(fields) < 6:
            log.debug("skipping unparsable squeue line %r", line)
            continue
        job_id, state, reason, elapsed, node, name = fields
        if "." in job_id:
            continue
        st = normalize_state(state)
        for task in expand_task_ids(job_id.strip()):
            states[task] = JobState(
                job_id=task,
                state=st,
                elapsed=elapsed.strip(),
                node=_clean(node),
                reason=_clean(reason),
                name=name.strip(),
                source="squeue",
            )
    return states


def merge_states(sacct: dict[str, JobState] | None, squeue: dict[str, JobState]) -> dict[str, JobState]:
    """sacct gives exit codes and the jobs the controller has forgotten; squeue, the controller's live
    view, wins on the state of the jobs it still lists (sacct lags a second or two behind it, both
    after a submission and after a job ends) and adds the pending reason."""
    if sacct is None:
        return dict(squeue)
    merged = dict(sacct)
    for task, sq in squeue.items():
        sa = merged.get(task)
        if sa is None:
            merged[task] = sq
            continue
        agree = sa.state == sq.state
        merged[task] = JobState(
            job_id=task,
            state=sq.state,
            exit_code=sa.exit_code if agree else "",
            elapsed=sa.elapsed if agree else sq.elapsed,
            node=sq.node or sa.node,
            reason=sq.reason,
            name=sa.name or sq.name,
            source=sa.source if agree else sq.source,
        )
    return merged
