"""Ranks for the train stage: torchrun's env, submitit (Slurm or its local executor), plain srun, or one process.

torch.distributed itself is initialised by accelerate/DeepSpeed from the env:// variables exported here.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from gptoss_hpc import slurm
from gptoss_hpc.config.schema import RunConfig

log = logging.getLogger(__name__)

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# torch.distributed / torchrun variables a job can inherit from the submitting shell (sbatch's default
# --export=ALL): left in place, every rank would believe what that shell believed (e.g. rank 0 of 1).
INHERITED_DIST_ENV = (*DIST_ENV, "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME")
INHERITED_DIST_PREFIXES = ("TORCHELASTIC_",)


def scrub_inherited_env(env: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """Remove RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*/TORCHELASTIC_* ... (as lingua's stool does); returns the names."""
    env = os.environ if env is None else env
    names = [k for k in list(env) if k in INHERITED_DIST_ENV or k.startswith(INHERITED_DIST_PREFIXES)]
    for k in names:
        del env[k]
    return sorted(names)


def _under_scheduler() -> bool:
    """A Slurm task or a submitit job: the scheduler, not the environment, says who is which rank."""
    return "SLURM_JOB_ID" in os.environ or bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _spawned_by_torchrun() -> bool:
    """torchrun (or `python -m torch.distributed.run`) is this process's parent, so its RANK etc. are fresh."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "torchrun" in parent or "torch.distributed.run" in parent


def global_rank() -> int:
    """This process's rank before or after setup_distributed: Slurm's/submitit's task id under a scheduler
    (an inherited RANK says nothing there), torchrun's RANK otherwise."""
    env = os.environ
    if _under_scheduler() and not _spawned_by_torchrun():
        for key in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
            if env.get(key, "").isdigit():
                return int(env[key])
    value = env.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def setup_distributed(cfg: RunConfig) -> dict[str, Any]:
    """Export RANK/WORLD_SIZE/MASTER_* for torch.distributed (env:// init, done by accelerate/DeepSpeed)."""
    scrubbed: list[str] = []
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun and _under_scheduler() and not _spawned_by_torchrun():
        torchrun = False  # inherited from the shell that ran sbatch: Slurm's values win
    if not torchrun:
        scrubbed = scrub_inherited_env()
        if scrubbed:
            log.warning("ignoring inherited %s: the ranks come from Slurm/submitit", " ".join(scrubbed))
    if torchrun:
        source = "env (torchrun)"
    elif _num_tasks() > 1:
        # Slurm tasks (srun / submitit) or submitit's local executor with tasks_per_node > 1.
        if os.environ.get("SUBMITIT_EXECUTOR"):  # a submitit job (Slurm or local executor)
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            os.environ["WORLD_SIZE"] = str(_num_tasks())  # the srun step's tasks, not the allocation's
            source = "submitit"
        else:  # plain `srun python -m gptoss_hpc.stages.train ...`
            _export_srun_env()
            source = "srun"
        _bind_task_gpu()
    else:
        # One process without torchrun: DeepSpeed/accelerate still want env:// values (else mpi4py).
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        source = "single process"
    # ACCELERATE_USE_CPU silently turns DeepSpeed off (plain DDP); SFTConfig(use_cpu=True) is the CPU switch.
    if os.environ.pop("ACCELERATE_USE_CPU", None) is not None:
        log.warning("ignoring ACCELERATE_USE_CPU (it disables DeepSpeed); cluster.accelerator=cpu sets use_cpu")
    if cfg.cluster.accelerator == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = {
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "source": source,
        "nodes": _num_nodes(),
        "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
        "backend": "gloo" if cfg.cluster.accelerator == "cpu" else "nccl",
        "scrubbed": scrubbed,
    }
    if info["rank"] == 0:
        log.info(
            "distributed: world size %d on %d node(s), master %s, backend %s, ranks from %s",
            info["world_size"],
            info["nodes"],
            info["master"],
            info["backend"],
            source,
        )
    return info


def _num_nodes() -> int:
    env = os.environ
    for key in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "GROUP_WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    return 1


def _bind_task_gpu() -> None:
    """Per-task GPU binding (`--gpus-per-task=1`): every task sees one device, its device 0, so LOCAL_RANK
    (accelerate's and DeepSpeed's device index) must be 0, else ranks above 0 hit "invalid device ordinal"."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def _num_tasks() -> int:
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_NTASKS" in env:
        return int(env["SUBMITIT_LOCAL_NTASKS"])
    if "SLURM_JOB_ID" in env:
        # srun sets SLURM_STEP_NUM_TASKS; a batch script run without srun is one process whatever --ntasks says
        return int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    return 1


def _export_srun_env() -> None:
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    hosts = slurm.hostnames(nodelist)
    step_tasks = int(env["SLURM_STEP_NUM_TASKS"])
    nodes = max(1, int(env.get("SLURM_STEP_NUM_NODES", "1")))
    env.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=str(step_tasks),
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(step_tasks // nodes),
        MASTER_ADDR=hosts[0] if hosts else "127.0.0.1",
    )
    # same port on every rank: derived from the job id, as submitit does
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_hostnames() -> list[str]:
    """Every rank's hostname, by rank (all_gather_object; a normal-path collective, never in an error path)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [socket.gethostname()]
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return [str(n) for n in names]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a tiny all-reduce; the flag itself where not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown_distributed() -> None:
    """Success path only: barrier + destroy; without it a rank sometimes aborts at exit (FACTS).

    Never call it on an error path: the barrier waits for ranks that may be stuck in another collective or
    dead, and the failing rank would then never exit (so srun's --kill-on-bad-exit never fires).
    Use abort_distributed there."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort_distributed() -> None:
    """Error path: drop the process group without any collective, so this rank exits now and its non-zero
    exit takes the srun step down (--kill-on-bad-exit); peers blocked on it fail or are killed."""
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
    except ImportError:
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if "nccl" in str(dist.get_backend()) and hasattr(c10d, "_abort_process_group"):
            # ncclCommAbort: does not wait for in-flight kernels; destroy (shutdown) may wait on them.
            c10d._abort_process_group()
        else:
            dist.destroy_process_group()  # gloo: local teardown, no message to peers
    except Exception as exc:  # the original error matters more; exiting without teardown is fine
        log.warning("process group teardown after an error failed: %s", exc)


def set_collective_timeout(seconds: float) -> float | None:
    """Give the live default process group `seconds` per collective (train.ddp_timeout) and return the
    timeout now in force, or None when not distributed.

    transformers passes ddp_timeout to init_process_group/DeepSpeed on GPUs but drops it with use_cpu=True;
    setting it on the group itself makes it hold on every path, so a rank stuck on a hung peer fails."""
    import datetime as dt

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if hasattr(c10d, "_set_pg_timeout"):
        c10d._set_pg_timeout(dt.timedelta(seconds=seconds))
    return collective_timeout_s()


def collective_timeout_s() -> float | None:
    """The default process group's per-collective timeout in seconds (what actually holds), or None."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not (dist.is_available() and dist.is_initialized()):
        return None
    pg = c10d._get_default_group()
    for device in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            continue
    return None
