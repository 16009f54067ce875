"""Thin, typed wrappers over Slurm's clients: every Slurm command of the package but sbatch (which submitit runs,
submission/executor.py): sacct / squeue / scancel / sinfo for the monitor CLIs and the cancel of a half-submitted
launch, the squeue lookup of a tagged job after a failed sbatch, `scontrol requeue` for the train stage, and
`scontrol show hostnames` for the ranks. At the bottom layer, so every layer that needs Slurm calls it here; what
the output means (JobState, parsing) is in gptoss_hpc.slurm_states.

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
import subprocess
from collections.abc import Iterable, Sequence

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.slurm_states import (
    NO_REASON,
    SACCT_FIELDS,
    TERMINAL_STATES,
    JobState,
    QueryResult,
    merge_states,
    parse_sacct,
    parse_squeue,
)

__all__ = ["TERMINAL_STATES", "JobState", "QueryResult", "SlurmError", "SlurmNotReachableError"]

log = logging.getLogger(__name__)

SQUEUE_FORMAT = "%i|%T|%r|%M|%N|%j"
TIMEOUT_S = 30

# scancel/squeue messages that only mean "this job is already gone".
_GONE = ("Invalid job id specified", "already completing or completed", "Job has already finished")


class SlurmError(GptossHpcError):
    """A Slurm command failed; the message carries the command and its stderr."""


class SlurmNotReachableError(SlurmError):
    """No Slurm client, no SLURM_CONF, or the controller does not answer."""


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
            reasons[parts[0]] = f"{parts[1]} ({parts[2]})" if parts[1] not in NO_REASON else parts[2]
    return reasons


def find_tagged(tag: str, job_name: str) -> list[str]:
    """Ids of this user's jobs named `job_name` whose comment is `tag` (any state slurmctld still holds)."""
    out = subprocess.run(
        ["squeue", "--me", "--noheader", "--states=all", f"--name={job_name}", "--Format=ArrayJobID:|,Comment:"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    ids: list[str] = []
    for line in out.splitlines():
        job_id, _, comment = line.partition("|")
        if comment.strip() == tag and job_id.strip() not in ids:
            ids.append(job_id.strip())
    return ids


def requeue(target: str) -> None:
    """`scontrol requeue <target>`. A job Slurm is already requeuing (preemption with PreemptMode=REQUEUE,
    or `scontrol requeue` from outside: both send SIGTERM) is fine as it is."""
    proc = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == 0:
        log.warning("requeued Slurm job %s", target)
        return
    state = subprocess.run(
        ["scontrol", "show", "job", "-o", target], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    already = ("JobState=REQUEUE" in state, "JobState=PENDING" in state, "pending execution" in proc.stderr)
    if any(already):
        log.warning("Slurm job %s is already being requeued (%s)", target, proc.stderr.strip())
        return
    raise SlurmError(f"`scontrol requeue {target}` failed: {proc.stderr.strip() or proc.returncode}")


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames`: a Slurm node list (`node[1-2]`) as one host name per node."""
    try:
        return subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SlurmError(f"cannot expand the Slurm node list {nodelist!r} with scontrol: {exc}") from exc
