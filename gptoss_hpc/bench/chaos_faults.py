"""The chaos soak's faults, each caused for real on the 2-node local Slurm (launchers/local_slurm.sh --nodes 2).

Every injector returns what it did, read back from the system (the PID it killed, the node whose processes
died, the checkpoint file it cut and its sizes, slurmctld's PID before and after), and raises FaultError when
it could not cause the fault, so a fault is never counted that did not happen.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.submission import slurm

log = logging.getLogger(__name__)

LOCAL_SLURM = Path(__file__).resolve().parents[2] / "launchers" / "local_slurm.sh"
CLUSTER_DIR = Path(os.environ.get("GPTOSS_SLURM_MULTI_DIR", "/var/tmp/gptoss_hpc_slurm_nodes"))
CLUSTER = "gptoss_nodes"  # ClusterName of the 2-node cluster (launchers/local_slurm_nodes.sh)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FaultError(GptossHpcError):
    """A fault could not be caused (its job was gone, a command failed): the soak reports it as not injected."""


@dataclass
class Injection:
    """One fault as it happened: when, what was done (read back), and the points it touched."""

    kind: str
    point: int | None
    at: float  # time.time() when it was caused
    detail: str
    affected: list[int] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)  # what the checks need: truncated step, node ...


def cluster(verb: str, *args: str, timeout: float = 300) -> str:
    """`bash launchers/local_slurm.sh <verb> <args> --nodes 2`; its stderr chatter on failure."""
    cmd = ["bash", str(LOCAL_SLURM), verb, *args, "--nodes", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise FaultError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc.stdout


# ------------------------------------------------------------------------------------------ processes
def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here reaps late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def job_pids(job_ids: set[str]) -> dict[int, str]:
    """Live processes of these 2-node-cluster jobs ("123": any task of array/job 123, "123_4": one array task), by
    PID: the task id they belong to. Read from each process's environment, so leftovers of a dead step count too."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _environ(int(entry.name))
        if env.get("SLURM_CLUSTER_NAME") != CLUSTER:  # the one-node cluster's jobs reuse the same ids
            continue
        array, task, job = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_JOB_ID")
        ids = {f"{array}_{task}", array} if array and task else {job}
        hit = ids & job_ids
        if hit and _alive(int(entry.name)):
            found[int(entry.name)] = f"{array}_{task}" if array and task else str(job)
    return found


def _is_rank(pid: int) -> bool:
    """A training process: submitit's job body in the srun step (not the batch shell, srun or slurmstepd)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # srun's own argv names the module too, and srun would forward the signal a second time
    return Path(argv[0].decode(errors="replace")).name.startswith("python") and b"submitit.core._submit" in argv


def rank_pid(task_id: str, rank: int = 0) -> int | None:
    """PID of the training process of global rank `rank` of a task."""
    for pid in job_pids({task_id}):
        if _is_rank(pid) and _environ(pid).get("SLURM_PROCID") == str(rank):
            return pid
    return None


def started_at(pid: int) -> float | None:
    """When a process started (epoch seconds), from /proc: field 22 of its stat, in clock ticks since boot."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def ctld_pid() -> int | None:
    try:
        return int((CLUSTER_DIR / "run" / "slurmctld.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def checkpoints(paths: PointPaths) -> list[tuple[int, Path]]:
    """(step, dir) of a point's checkpoint-N folders, oldest first."""
    if not paths.train.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in paths.train.iterdir() if (m := _CHECKPOINT.match(d.name)) and d.is_dir()]
    return sorted(found)


def loads(directory: Path) -> str:
    """'' when a checkpoint holds what a resume reads and each part parses, else what is wrong."""
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
        from safetensors import safe_open

        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                f.get_tensor(key)
        import torch

        torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure to read is the finding itself
        return f"{directory.name}: {type(exc).__name__}: {str(exc)[:80]}"
    if f"checkpoint-{state.get('global_step')}" != directory.name:
        return f"{directory.name}: trainer_state.json says global_step {state.get('global_step')}"
    return ""


# ---------------------------------------------------------------------------------------------- faults
def rank_kill(task_id: str) -> Injection:
    pid = rank_pid(task_id, 0)
    if pid is None:
        raise FaultError(f"no rank-0 process of task {task_id} to kill")
    os.kill(pid, signal.SIGKILL)
    if not wait_until(lambda: not _alive(pid), 10):
        raise FaultError(f"rank 0 of {task_id} (pid {pid}) still alive 10 s after SIGKILL")
    return Injection("rank_kill", None, time.time(), f"SIGKILL to rank 0 of {task_id} (pid {pid})")


def preempt(task_id: str) -> Injection:
    """What slurmstepd does at --signal=USR2@<s> or on preemption: USR2 to every task of the job's step. Sent
    to the processes directly: `scancel --signal` retries for as long as slurmctld answers "Job can not be
    altered now" (seen right after a controller restart), and a late retry would preempt the resumed run."""
    pids = [p for p in job_pids({task_id}) if _is_rank(p)]
    if not pids:
        raise FaultError(f"task {task_id} has no running rank to preempt")
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    return Injection("preempt", None, time.time(), f"SIGUSR2 to the ranks of {task_id} (pids {pids})")


def node_kill(task_id: str, launch_tasks: list[str]) -> Injection:
    """SIGKILL to every process of the node `task_id` runs on (its slurmd too), then, once slurmctld has
    taken the node's jobs off it, the node back (slurmd restarted): a node that died and was rebooted."""
    states = slurm.squeue(launch_tasks)
    node = states[task_id].node if task_id in states else ""
    if not re.fullmatch(r"node\d+", node) or states[task_id].state != "RUNNING":
        raise FaultError(f"task {task_id} is not running on one node (squeue: {states.get(task_id)})")
    on_node = [t for t, st in states.items() if st.state == "RUNNING" and st.node == node]
    cluster("kill-node", node.removeprefix("node"))
    killed = time.time()

    def moved_off() -> bool:
        now = slurm.squeue(on_node)
        return all(not (st.state == "RUNNING" and st.node == node) for st in now.values())

    gone = wait_until(moved_off, 150, every=2)
    cluster("revive-node", node.removeprefix("node"))
    if not gone:
        raise FaultError(f"{node} killed, but slurmctld still shows {on_node} running there after 150 s")
    detail = f"SIGKILL to every process of {node} (tasks {', '.join(on_node)}); {node} revived"
    return Injection("node_kill", None, killed, detail, facts={"node": node, "tasks": on_node})


def ckpt_truncate(task_id: str, paths: PointPaths) -> Injection:
    """The job stopped hard, as by a node that loses power (its ranks frozen with SIGSTOP, the job requeued
    and held by `scontrol requeuehold`, the ranks SIGKILLed: nothing saved, no step past the freeze), its newest
    whole checkpoint's adapter weights cut to half their size, then the job released: it must resume from the
    newest checkpoint that loads, and say which one it skipped."""
    ranks = [p for p in job_pids({task_id}) if _is_rank(p)]
    if not ranks:
        raise FaultError(f"task {task_id} has no running rank to stop")
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    subprocess.run(["scontrol", "requeuehold", task_id], check=True, capture_output=True, text=True)
    for pid in ranks:  # Slurm would SIGKILL them after KillWait; submitit ignores its SIGTERM
        os.kill(pid, signal.SIGKILL)
    if not wait_until(lambda: not job_pids({task_id}), 60):
        raise FaultError(f"{task_id} still has processes 60 s after scontrol requeuehold")
    # the newest checkpoint that is whole: the stop may have cut a save short, and that one is skipped anyway
    found = [(step, d) for step, d in checkpoints(paths) if not loads(d)]
    if len(found) < 2:
        subprocess.run(["scontrol", "release", task_id], check=True, capture_output=True, text=True)
        raise FaultError(f"{paths.train} holds {len(found)} whole checkpoint(s): nothing older to resume from")
    step, newest = found[-1]
    target = newest / "adapter_model.safetensors"
    if not target.is_file():
        subprocess.run(["scontrol", "release", task_id], check=True, capture_output=True, text=True)
        raise FaultError(f"{target} does not exist")
    size = target.stat().st_size
    os.truncate(target, size // 2)
    cut = target.stat().st_size
    subprocess.run(["scontrol", "release", task_id], check=True, capture_output=True, text=True)
    detail = f"{task_id} requeue-held; {newest.name}/{target.name} cut {size} -> {cut} bytes; released"
    return Injection("ckpt_truncate", None, time.time(), detail, facts={"truncated_step": step, "dir": str(newest)})


def ctld_restart() -> Injection:
    before = ctld_pid()
    cluster("restart-ctld")
    after = ctld_pid()
    if before is None or after is None or before == after:
        raise FaultError(f"slurmctld pid before {before}, after {after}: not restarted")
    return Injection("ctld_restart", None, time.time(), f"slurmctld restarted (pid {before} -> {after})")
