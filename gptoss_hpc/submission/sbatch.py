"""Config -> submitit executor parameters, per stage. Pure functions: golden-tested against sbatch text.

Train jobs take the whole allocation (nodes x one task per GPU); merge and eval take `aux_gpus` on one
node; the report needs no GPU. Secrets never appear here: jobs inherit them from the submitting shell
(sbatch's default --export=ALL).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from gptoss_hpc import secrets
from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import ClusterConfig, RunConfig

STAGE_MODULES = {
    "train": "gptoss_hpc.stages.train",
    "merge": "gptoss_hpc.stages.merge",
    "eval": "gptoss_hpc.stages.eval",
    "serve": "gptoss_hpc.stages.serve",
    "report": "gptoss_hpc.stages.report",
}
# The stage each one waits for: the first of these that the launch runs.
# the first one launched is the parent; eval/serve follow train directly with eval.model=adapter (no merge)
PARENTS = {
    "merge": ("train",),
    "eval": ("merge", "train"),
    "serve": ("merge", "train"),
    "report": ("eval", "merge", "train"),
}


def job_name(cfg: RunConfig, stage: str) -> str:
    return f"gptoss-{cfg.name}-{stage}"


def stage_command(stage: str, target: str) -> str:
    """What a job of this stage runs, as a user would type it to re-run it by hand."""
    return f"python -m {STAGE_MODULES[stage]} {shlex.quote(target)}"


def python_command(cluster: ClusterConfig) -> str:
    """The interpreter submitit starts in the job (inside the container when there is one)."""
    python = shlex.quote(sys.executable)
    c = cluster.container
    if c.kind == "apptainer":
        binds = [f"--bind={shlex.quote(m)}" for m in c.mounts]
        extra = [shlex.quote(a) for a in c.extra_args]
        return " ".join(["apptainer", "exec", "--nv", *binds, *extra, shlex.quote(str(c.image)), "python"])
    if c.kind == "pyxis":
        return "python"
    return python


def slurm_parameters(
    cfg: RunConfig, stage: str, *, target: str, dependency: str | None = None, tag: str | None = None
) -> dict[str, Any]:
    """submitit SlurmExecutor.update_parameters() kwargs for one stage of this config.

    `target` is the config path (or, for arrays, its pattern with $SLURM_ARRAY_TASK_ID) shown in the
    script so a reader sees which stage runs and how to re-run it by hand. `tag` becomes the job's
    comment: the launch's unique id, which an sbatch retry looks up (gptoss_hpc.submission.executor).
    """
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": job_name(cfg, stage),
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "array_parallelism": c.array_parallelism,
        "signal_delay_s": c.signal_delay_s,
        "comment": tag,
    }
    if stage == "train":
        params.update(
            nodes=c.nodes,
            ntasks_per_node=derive.tasks_per_node(c),
            cpus_per_task=c.cpus_per_task,
            time=derive.slurm_time_minutes(c.time),
        )
        gpus = c.gpus_per_node
        if c.gpus_per_task is not None and gpus > 0:
            params["gpus_per_task"] = c.gpus_per_task  # per-task binding: every task sees its device 0
    else:
        params.update(nodes=1, ntasks_per_node=1, time=derive.slurm_time_minutes(c.aux_time))
        params["cpus_per_task"] = c.cpus_per_task if stage != "report" else min(c.cpus_per_task, 4)
        gpus = 0 if stage == "report" else min(c.aux_gpus, c.gpus_per_node)
    if gpus > 0 and "gpus_per_task" not in params:
        params["gpus_per_node"] = gpus
    if c.mem is not None:
        params["mem"] = c.mem
    elif c.mem_per_gpu is not None and gpus > 0:
        params["mem_per_gpu"] = c.mem_per_gpu

    extra: dict[str, Any] = {}
    for key, value in c.sbatch_extra.items():
        extra[key] = True if value in ("", None, True) else value
    if dependency:
        extra["dependency"] = dependency
        # A dependent whose parent failed is cancelled, not left PENDING (DependencyNeverSatisfied) forever.
        extra["kill-on-invalid-dep"] = "yes"
    if stage == "train" and c.max_requeues > 0:
        extra["requeue"] = True
    elif stage == "train":
        extra["no-requeue"] = True  # else Slurm's JobRequeue=1 default requeues it after a node failure
    if stage == "train":
        extra["signal"] = f"{c.preempt_signal}@{c.signal_delay_s}"  # what stages/train.py checkpoints on
    if extra:
        params["additional_parameters"] = extra

    setup = [f"# gptoss_hpc stage {stage}: {stage_command(stage, target)}  (run below by submitit's _submit)"]
    setup += [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(job_env(c).items())]
    setup += list(c.setup)
    params["setup"] = setup
    if c.container.kind == "pyxis":
        srun = [f"--container-image={c.container.image}"]
        if c.container.mounts:
            srun.append(f"--container-mounts={','.join(c.container.mounts)}")
        params["srun_args"] = srun + list(c.container.extra_args)
    if stage == "train":
        # A rank that exits non-zero (an exception, a signal) ends the step's other ranks, which would
        # otherwise wait in a collective for it until the process-group timeout (train.ddp_timeout).
        params["srun_args"] = ["--kill-on-bad-exit=1", *params.get("srun_args", [])]
    return {k: v for k, v in params.items() if v is not None}


def job_env(c: ClusterConfig) -> dict[str, str]:
    """The environment a job gets on top of the inherited one: cluster.env, plus the shared Hub cache.

    With cluster.hf_home the launcher has already downloaded model, tokenizer and dataset there
    (gptoss_hpc.modeling.hub.prefetch), so jobs run offline: compute nodes need no internet, and no rank
    downloads anything after the queue wait.
    """
    env = {str(k): str(v) for k, v in c.env.items()}
    if c.hf_home:
        # Quoted in the script, so no shell expands `~` there: expand it here, where the prefetch does.
        env.setdefault("HF_HOME", str(Path(c.hf_home).expanduser().absolute()))
        env.setdefault("HF_HUB_OFFLINE", "1")
        # A new HF_HOME would hide the user's saved token ($HF_HOME/token): name the file instead (a path, no secret).
        token_file = secrets.token_file()
        if token_file is not None:
            env.setdefault("HF_TOKEN_PATH", str(token_file.resolve()))
    return env


def local_parameters(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """submitit LocalExecutor kwargs: the same ranks and GPUs as on Slurm, as local processes.

    submitit's LocalExecutor exports CUDA_VISIBLE_DEVICES="" unless it gets gpus_per_node: without it a GPU job
    sees no GPU (``Your setup doesn't support bf16/gpu``). Train: one rank per GPU, each task seeing all of
    them and picking its own by LOCAL_RANK, as under srun; merge/eval/serve: aux_gpus; report: none."""
    c = cfg.cluster
    minutes = derive.slurm_time_minutes(c.time if stage == "train" else c.aux_time) or 60
    tasks = derive.tasks_per_node(c) if stage == "train" else 1
    params: dict[str, Any] = {"timeout_min": minutes, "tasks_per_node": tasks, "signal_delay_s": c.signal_delay_s}
    if c.accelerator == "gpu":
        aux = 0 if stage == "report" else min(c.aux_gpus, c.gpus_per_node)
        gpus = c.gpus_per_node if stage == "train" else aux
        if gpus > 0:
            params["gpus_per_node"] = gpus
            # submitit numbers a local job's GPUs from 0 unless told which are visible: a check pinned to GPU 1
            # (CUDA_VISIBLE_DEVICES=1) would otherwise run its jobs on GPU 0, beside whatever runs there
            visible = [int(d) for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip().isdigit()]
            if visible:
                params["visible_gpus"] = visible
    return params


def array_target(run_dir: Path) -> str:
    return f"{run_dir}/p$(printf %03d $SLURM_ARRAY_TASK_ID)/config.yaml"
