"""Thin, typed wrappers over sacct / squeue / scancel / sinfo: every Slurm query of the package (the monitor CLIs
and the cancel of a half-submitted launch). sbatch itself is run by submitit (submission/executor.py).

One refresh costs at most one `sacct` and one `squeue` call, whatever the number of jobs:

    sacct --parsable2 --noheader -j 123,124 --format=JobID,State,ExitCode,Elapsed,NodeList,JobName
    squeue -h -r --states=all -j 123,124 -o '%i|%T|%r|%M|%N|%j'

sacct is the source of truth when accounting works (it keeps finished jobs; without `--duplicates` it shows
the newest attempt of a requeued job); squeue gives the pending reason (Dependency, Resources, Priority...),
covers the second or two sacct lags after a submission, and is the fallback when accounting is disabled.
Job steps (`123.batch`, `123.extern`, `123.0`) are skipped; pending arrays that Slurm prints grouped
(`123_[0-3,7%2]`) are expanded into one entry per task (`123_0` ... `123_3`, `123_7`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "NodeList", "JobName")
SQUEUE_FORMAT = "%i|%T|%r|%M|%N|%j"
TIMEOUT_S = 30

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
_NO_REASON = frozenset({"", "None", "(null)", "n/a"})
_GROUPED = re.compile(r"^(?P<base>\d+)_\[(?P<ranges>[^\]]+)\]$")
# scancel/squeue messages that only mean "this job is already gone".
_GONE = ("Invalid job id specified", "already completing or completed", "Job has already finished")


class SlurmError(GptossHpcError):
    """A Slurm command failed; the message carries the command and its stderr."""


class SlurmNotReachableError(SlurmError):
    """No Slurm client, no SLURM_CONF, or the controller does not answer."""


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
    return "" if value in _NO_REASON or value == "None assigned" else value


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


# ---------------------------------------------------------------------------------------------- calls


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client; a missing binary or a hang becomes SlurmNotReachableError."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # the clients would spend a minute failing on it
        raise SlurmNotReachableError(
            f"Slurm not reachable: SLURM_CONF={conf} does not exist"
            " (launchers/local_slurm.sh start prints the right export line)"
        )
    try:
        return subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError as exc:
        raise SlurmNotReachableError(f"Slurm not reachable: `{cmd[0]}` is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmNotReachableError(
            f"Slurm not reachable: `{' '.join(cmd[:2])} ...` did not answer within {TIMEOUT_S} s"
        ) from exc


def _first_line(stderr: str | None) -> str:
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    return lines[0] if lines else "(no stderr)"


def _unreachable(cmd: Sequence[str], exc: subprocess.CalledProcessError) -> SlurmNotReachableError:
    hint = ""
    if "configuration source" in (exc.stderr or "") or "slurm.conf" in (exc.stderr or ""):
        hint = " (is SLURM_CONF set? launchers/local_slurm.sh start prints the export line)"
    return SlurmNotReachableError(f"Slurm not reachable: {cmd[0]} failed: {_first_line(exc.stderr)}{hint}")


def sacct(job_ids: Iterable[str]) -> dict[str, JobState]:
    """States from accounting, one call for any number of ids (array job ids bring all their tasks)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    cmd = [
        "sacct",
        "--parsable2",
        "--noheader",
        "-j",
        ",".join(ids),
        f"--format={','.join(SACCT_FIELDS)}",
    ]
    try:
        proc = _run(cmd)
    except subprocess.CalledProcessError as exc:
        raise SlurmError(f"sacct failed (exit {exc.returncode}): {_first_line(exc.stderr)}") from exc
    return parse_sacct(proc.stdout)


def attempts(job_ids: Iterable[str] = (), *, since: str | None = None) -> list[JobState]:
    """Every run of these jobs, or of every job of the cluster submitted since `since` (sacct's -S, e.g.
    2026-12-07T20:10:00), oldest first: with `--duplicates` a requeued task has one line per attempt
    (REQUEUED, NODE_FAIL ..., then its newest). What shows a job was run or submitted twice."""
    ids = sorted(set(job_ids))
    cmd = ["sacct", "--parsable2", "--noheader", "--duplicates", "-X", f"--format={','.join(SACCT_FIELDS)}"]
    cmd += ["-j", ",".join(ids)] if ids else ["--allusers", "-S", since or "now-1days"]
    try:
        proc = _run(cmd)
    except subprocess.CalledProcessError as exc:
        raise SlurmError(f"sacct failed (exit {exc.returncode}): {_first_line(exc.stderr)}") from exc
    return [state for line in proc.stdout.splitlines() for state in parse_sacct(line).values()]


def squeue(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Live states and reasons from the controller (`-r`: one line per array task; finished jobs stay
    listed for MinJobAge seconds). One call for any number of ids; ids Slurm forgot are simply absent."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    cmd = ["squeue", "-h", "-r", "--states=all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT]
    try:
        proc = _run(cmd)
    except subprocess.CalledProcessError as exc:
        if any(g in (exc.stderr or "") for g in _GONE):
            return {}  # squeue -j <one finished id> errors instead of printing nothing
        raise _unreachable(cmd, exc) from exc
    return parse_squeue(proc.stdout)


def query(job_ids: Iterable[str], *, tasks: Iterable[str] | None = None, use_sacct: bool = True) -> QueryResult:
    """One refresh: sacct (when accounting works) and squeue. squeue is skipped only when `tasks` (the
    task ids the caller expects, e.g. "123_4") all have their own finished line in sacct. Keys of the
    result are task ids ("123_4") and plain job ids ("124")."""
    ids = sorted(set(job_ids))
    if not ids:
        return QueryResult({}, "sacct" if use_sacct else "squeue")
    from_sacct: dict[str, JobState] | None = None
    sacct_error = ""
    if use_sacct:
        try:
            from_sacct = sacct(ids)
        except SlurmNotReachableError:
            raise
        except SlurmError as exc:
            sacct_error = str(exc)
            log.info("sacct unavailable, using squeue: %s", exc)
    if from_sacct is not None and tasks is not None and _all_final(tasks, from_sacct):
        return QueryResult(from_sacct, "sacct")
    from_squeue = squeue(ids)
    source = "sacct" if from_sacct is not None else "squeue"
    return QueryResult(merge_states(from_sacct, from_squeue), source, sacct_error)


def _all_final(tasks: Iterable[str], states: dict[str, JobState]) -> bool:
    """True when every expected task has its own (not range) finished line."""
    for task in tasks:
        st = states.get(task)
        if st is None or st.grouped or not st.terminal:
            return False
    return True


def scancel(job_ids: Iterable[str]) -> None:
    """Cancel these jobs (an array job id cancels all its unfinished tasks) in one call; ids that are
    already finished or forgotten are not an error."""
    ids = sorted(set(job_ids))
    if not ids:
        return
    cmd = ["scancel", *ids]
    try:
        _run(cmd)
    except subprocess.CalledProcessError as exc:
        bad = [ln for ln in (exc.stderr or "").splitlines() if ln.strip() and not any(g in ln for g in _GONE)]
        if bad:
            if "configuration source" in exc.stderr or "Unable to contact" in exc.stderr:
                raise _unreachable(cmd, exc) from exc
            raise SlurmError(f"scancel failed (exit {exc.returncode}): {bad[0].strip()}") from exc


def check_reachable() -> None:
    """Raise SlurmNotReachableError with one clear line unless the controller answers."""
    cmd = ["squeue", "-h", "--me", "-o", "%i"]
    try:
        _run(cmd)
    except subprocess.CalledProcessError as exc:
        raise _unreachable(cmd, exc) from exc


def available() -> bool:
    """True when Slurm's clients are installed and the controller answers."""
    try:
        check_reachable()
    except SlurmNotReachableError:
        return False
    return True


def node_reasons(nodelist: str) -> dict[str, str]:
    """Why nodes of a job's node list are down/drained/failing, e.g. {"node2": "Not responding (down*)"}
    (one `sinfo -R` call; {} when none of them is, or when sinfo cannot answer)."""
    if not nodelist:
        return {}
    cmd = ["sinfo", "-h", "-R", "-N", "-n", nodelist, "-o", "%N|%E|%T"]
    try:
        out = _run(cmd).stdout
    except (subprocess.CalledProcessError, SlurmNotReachableError):
        return {}
    reasons: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0]:
            reasons[parts[0]] = f"{parts[1]} ({parts[2]})" if parts[1] not in _NO_REASON else parts[2]
    return reasons
