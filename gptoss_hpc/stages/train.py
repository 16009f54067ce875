"""SFT train stage: LoRA on gpt-oss with TRL's SFTTrainer (+ DeepSpeed ZeRO), one sweep point per job.

    python -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml
    torchrun --nproc_per_node=2 -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml
    srun --ntasks-per-node=8 python -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml

Ranks come from torchrun's env, else from Slurm/submitit (``TorchDistributedEnvironment``), else one
process. A re-run resumes from the newest complete ``train/checkpoint-N``. On ``cluster.preempt_signal``
(SIGUSR2 by default, or SIGTERM: Slurm's warning before the time limit, or preemption) every rank finishes
its step, a checkpoint is saved, and under the launcher (``TrainJob``) the job requeues itself up to
``cluster.max_requeues`` times (stages/requeue.py); run by hand it exits non-zero saying how to resume.

Outputs (rank 0): ``adapter/`` (adapter safetensors + config, tokenizer, deepspeed.json), ``metrics.jsonl``
(one JSON line per logging step), ``train_metrics.json``, TensorBoard in ``train/runs/``; W&B only when
WANDB_API_KEY is set; a Hub push of the adapter when HF_TOKEN is set, train.push_to_hub is true and
PUSH_TO_HUB is not "false". A W&B or Hub failure is a warning (status/train.json "warnings"), never a failed
run: W&B falls back to offline files under ``wandb/`` (``wandb sync`` them later), then to TensorBoard only.

On an error a rank tears down without any collective and exits non-zero; srun's --kill-on-bad-exit then ends
the other ranks (see modeling/distributed.py). Test-only fault hook: ``GPTOSS_HPC_TEST_RAISE_AT=<rank>:<step>``
(``<rank>:<step>:<point>``: that point only) makes that rank raise InjectedFault at the end of that optimizer
step (the fault tests use it); ``GPTOSS_HPC_TEST_NAN_AT=<rank>:<step>[:<point>]`` makes that rank's loss NaN
in that step (stages/divergence.py).
Checkpoints are written aside and renamed into place, and a resume skips damaged ones (stages/checkpoints.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from gptoss_hpc.config import RunConfig, load_run_config
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.modeling.distributed import (
    DIST_ENV,
    abort_distributed,
    collective_timeout_s,
    global_rank,
    rank_hostnames,
    set_collective_timeout,
    setup_distributed,
    shutdown_distributed,
)
from gptoss_hpc.modeling.hub import push_folder
from gptoss_hpc.modeling.profiling import profile_callback
from gptoss_hpc.modeling.tracking import finish_wandb, start_wandb
from gptoss_hpc.modeling.trainer import recompile_watch_callback, speed_knobs_callback, trainer_class
from gptoss_hpc.monitor.records import write_data_record
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.checkpoints import atomic_checkpoint_class, checkpoint_step, clear_staging, latest_checkpoint
from gptoss_hpc.stages.common import run_stage, stage_cli, stage_warning, write_status
from gptoss_hpc.stages.divergence import DivergenceGuard, guarded_trainer_class
from gptoss_hpc.stages.requeue import (
    RequeueLimitError,
    RequeuePolicy,
    preempt_signum,
    requeue,
    requeue_target,
    restart_count,
)
from gptoss_hpc.stages.run_facts import train_run_facts
from gptoss_hpc.stages.train_callbacks import (  # noqa: F401  (FAULT_ENV, InjectedFault: the tests' hook)
    FAULT_ENV,
    PREEMPT,
    InjectedFault,
    Preempted,
    fault_callback,
    metrics_and_preemption,
    on_preempt,
)

log = logging.getLogger(__name__)

STAGE = "train"


# -------------------------------------------------------------------------------------------- the stage
def main(config_path: str | Path) -> dict[str, Any]:
    return run_stage(STAGE, config_path, train)


def train(cfg: RunConfig, paths: PointPaths) -> dict[str, Any]:
    from gptoss_hpc.modeling.model import check_reachable

    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    dist_info = setup_distributed(cfg)
    if threading.current_thread() is threading.main_thread():
        signal.signal(preempt_signum(cfg.cluster), on_preempt)
    try:
        check_reachable(cfg)  # model/tokenizer: one message before any rank loads anything heavy
        result = _train(cfg, paths, dist_info)
    except BaseException:
        # No collective here (a barrier would wait forever on a peer stuck in all_gather, and this rank would
        # never exit): drop the group and re-raise, so the non-zero exit takes the srun step down.
        abort_distributed()
        raise
    else:
        shutdown_distributed()
        return result
    finally:
        for k, v in saved_env.items():  # leave the caller's environment as it was (in-process callers)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train(cfg: RunConfig, paths: PointPaths, dist_info: dict[str, Any]) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    from gptoss_hpc.config.lengths import with_length
    from gptoss_hpc.data import load_data
    from gptoss_hpc.modeling.batch_facts import check_batch_facts
    from gptoss_hpc.modeling.deepspeed import render_deepspeed_config
    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.sft import build_sft_config_kwargs, deepspeed_json_path, sft_dataset, wandb_enabled
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    rank0 = dist_info["rank"] == 0
    if paths.train_metrics.is_file() and (paths.adapter / "adapter_config.json").is_file():
        # train_metrics.json is written only after a finished run: re-running a finished point (by hand, or a
        # requeue that raced the end) must not train one step past max_steps from the last checkpoint.
        log.info("%s already holds a finished adapter; delete %s to train again", paths.root, paths.train_metrics)
        return json.loads(paths.train_metrics.read_text())
    paths.train.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    loaded = load_data(cfg, tokenizer)
    if rank0:
        write_data_record(paths, loaded.stats)  # rows kept, dropped, truncated: status and the report show them
    if cfg.train.max_length is None:  # a config no launch resolved (run by hand): the length the data asked for
        cfg = with_length(cfg, loaded.stats["max_length"], ())
    train_ds = sft_dataset(loaded.train)  # loss on each row's last assistant turn
    _drop_none_turn_keys(tokenizer)

    kwargs = build_sft_config_kwargs(cfg, paths)
    if "deepspeed" in kwargs:
        ds_config = render_deepspeed_config(cfg, dist_info["world_size"])
        write_atomic(deepspeed_json_path(paths), json.dumps(ds_config, indent=2) + "\n")
    if wandb_enabled():
        os.environ.setdefault("WANDB_PROJECT", cfg.name)
        os.environ["WANDB_DIR"] = str(paths.root)
        # Only rank 0 logs to W&B (transformers' WandbCallback); it starts the run here, so a failure is a
        # warning and not an exception inside trainer.train() while the other ranks wait in a collective.
        if rank0 and not start_wandb(paths, kwargs["run_name"]):
            kwargs["report_to"] = [r for r in kwargs["report_to"] if r != "wandb"]
    args = SFTConfig(**kwargs)
    # every rank: the DeepSpeed JSON, accumulation and effective batch are the config's and the same on all ranks
    batch = check_batch_facts(cfg, args, deepspeed_json_path(paths) if "deepspeed" in kwargs else None)

    profile_cb = profile_callback(paths.train)  # a bad GPTOSS_HPC_PROFILE_STEPS fails here, before the model loads
    model = load_base_model(cfg, paths, for_training=True)
    metrics_cb, preempt_cb = metrics_and_preemption(paths, dist_info["world_size"])
    callbacks = [metrics_cb, preempt_cb]
    knobs_cb = speed_knobs_callback(cfg)
    if knobs_cb is not None:
        callbacks.append(knobs_cb)
    callbacks.append(recompile_watch_callback(stage_warning))
    if profile_cb is not None:
        callbacks.append(profile_cb)
    fault_cb = fault_callback(paths.root.name)
    if fault_cb is not None:
        callbacks.append(fault_cb)
    trainer_cls = trainer_class(SFTTrainer, cfg, dist_info["world_size"], "deepspeed" in kwargs)
    guard = DivergenceGuard(cfg, lambda: latest_checkpoint(paths.train)) if cfg.train.stop_on_divergence else None
    trainer_cls = atomic_checkpoint_class(guarded_trainer_class(trainer_cls, guard, paths.root.name))
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=None,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
        callbacks=callbacks,
    )
    set_collective_timeout(cfg.train.ddp_timeout)
    if cfg.model.experts_dtype == "mxfp4":
        from gptoss_hpc.modeling.mxfp4.experts import release_placeholders

        release_placeholders(trainer.model)  # before DeepSpeed's broadcast of every parameter (train() wraps)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.4f%%)", trainable, total, 100 * trainable / total)

    resume = latest_checkpoint(paths.train, warn=stage_warning if rank0 else log.warning)
    if rank0:
        clear_staging(paths.train)  # before train(): no rank saves before the first optimizer step
    if resume is not None:
        # the chaos soak and `status` read where the run resumed: the first step it trains is resumed_step + 1
        log.info("resuming from %s", resume)
        record = {"event": "resumed", "checkpoint": str(resume), "resumed_step": checkpoint_step(resume)}
        write_status(paths, STAGE, "RUNNING", **record)
        if rank0:  # kept after the status file moves on; readers of metrics.jsonl skip rows without a loss
            with paths.metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    engine = _engine_facts(trainer)

    if preempt_cb.triggered:
        saved = latest_checkpoint(paths.train)
        raise Preempted(str(saved) if saved else None, trainer.state.global_step)

    trainer.save_model(str(paths.adapter))  # every rank calls it; rank 0 writes adapter + tokenizer
    metrics: dict[str, Any] = {}
    if rank0:
        if "deepspeed" in kwargs:
            shutil.copy2(deepspeed_json_path(paths), paths.adapter / "deepspeed.json")
        losses = metrics_cb.losses
        metrics = {
            "train_loss": result.training_loss,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "logged_losses": len(losses),
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "tokens": int(trainer.state.num_input_tokens_seen or 0),
            "runtime_s": time.time() - started,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "resumed_from": str(resume) if resume else None,
            "resumed_step": checkpoint_step(resume) if resume else None,
            "world_size": dist_info["world_size"],
            "rank_source": dist_info["source"],
            "trainable_params": trainable,
            "total_params": total,
            "train_rows": len(train_ds),
            **engine,
            **train_run_facts(trainer, paths, dist_info["world_size"]),
            "speed_knobs": knobs_cb.summary if knobs_cb is not None else None,
            "batch": batch,
            "hub_repo": None,
            "hub_push": None,
        }
        finish_wandb()
        write_atomic(paths.train_metrics, json.dumps(metrics, indent=2) + "\n")
        try:
            metrics["hub_repo"] = push_folder(cfg, paths, paths.adapter, what="adapter")
            metrics["hub_push"] = "pushed" if metrics["hub_repo"] else None
        except GptossHpcError as exc:  # the adapter is saved: a push that failed must not fail the run
            metrics["hub_push"] = f"push failed: {exc}"
            stage_warning(metrics["hub_push"])
        if metrics["hub_push"]:
            write_atomic(paths.train_metrics, json.dumps(metrics, indent=2) + "\n")
    return metrics


def _engine_facts(trainer) -> dict[str, Any]:
    """What actually ran (silent fallbacks happen): DeepSpeed engine and ZeRO stage, backend, device."""
    import torch.distributed as dist

    wrapped = trainer.model_wrapped
    ds = bool(getattr(trainer, "is_deepspeed_enabled", False))
    stage = None
    if ds and hasattr(wrapped, "zero_optimization_stage"):
        stage = int(wrapped.zero_optimization_stage())
    return {
        "deepspeed": ds,
        "engine": type(wrapped).__name__,
        "zero_stage": stage,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "distributed_world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "device": str(trainer.args.device),
        "pg_timeout_s": collective_timeout_s(),
        "hosts": rank_hostnames(),  # every rank's hostname, by rank: how many nodes really took part
        "master_addr": os.environ.get("MASTER_ADDR"),
    }


def _drop_none_turn_keys(tokenizer) -> None:
    """Arrow gives every turn every key, so a turn without thinking has ``thinking: None`` and the gpt-oss
    template fails on it (``"thinking" in message``). Drop None-valued keys before rendering."""
    from gptoss_hpc.data.rows import template_messages

    original = tokenizer.apply_chat_template

    def apply_chat_template(conversation, *args, **kwargs):
        if isinstance(conversation, list) and conversation and isinstance(conversation[0], dict):
            conversation = [
                {**{k: v for k, v in t.items() if v is not None}, **template_messages([t])[0]} for t in conversation
            ]
        return original(conversation, *args, **kwargs)

    tokenizer.apply_chat_template = apply_chat_template


# -------------------------------------------------------------------------------------- the Slurm job
class TrainJob(submitit.helpers.Checkpointable):
    """What the launcher submits (``executor.map_array(TrainJob(), config_paths)``).

    On ``cluster.preempt_signal`` (USR2 or TERM: the time-limit warning or preemption) every rank finishes its
    step and a checkpoint is saved (our handler + the trainer callback); then rank 0 requeues this job (an
    array task: only itself) while ``cluster.max_requeues`` allows, else the job fails saying so. The requeued
    job resumes from the checkpoint at the same global step.
    """

    clock: Callable[[], float] = time.time  # class default: a job pickled before this attribute existed

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def __call__(self, config_path: str) -> dict[str, Any]:
        started = self.clock()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        try:
            return main(config_path)
        except Preempted as exc:
            paths = PointPaths.from_config(config_path)
            if "SLURM_JOB_ID" not in os.environ and callable(submitit_handler):
                # submitit's local executor: its own handler checkpoints and restarts the tasks
                write_status(paths, STAGE, "REQUEUED", checkpoint=exc.checkpoint, step=exc.step)
                if global_rank() != 0:
                    time.sleep(120)  # rank 0 requeues the whole job, which ends this task
                    raise
                submitit_handler(signal.SIGUSR2, None)  # submitit: checkpoint() → requeue → sys.exit
                raise
            cluster = load_run_config(paths.config).cluster
            decision = RequeuePolicy.for_cluster(cluster, started, self.clock).decide(restart_count())
            message = decision.describe(exc.step, exc.checkpoint)
            rank0 = global_rank() == 0
            if not decision.requeue:
                if rank0:
                    write_status(paths, STAGE, "FAILED", error=message, checkpoint=exc.checkpoint, step=exc.step)
                raise RequeueLimitError(message) from exc
            if rank0:
                write_status(paths, STAGE, "REQUEUED", checkpoint=exc.checkpoint, step=exc.step, reason=message)
            log.warning("%s", message)
            if not rank0:
                time.sleep(120)  # rank 0 requeues the job, which ends this task
                raise
            # requeueing sends SIGTERM to every task: it must not start another checkpoint
            signal.signal(preempt_signum(cluster), signal.SIG_IGN)
            requeue(requeue_target())
            # SystemExit, not an exception: submitit then writes no result, and the requeued run writes it
            raise SystemExit(f"requeued: {message}") from exc

    def checkpoint(self, config_path: str) -> submitit.helpers.DelayedSubmission:
        PREEMPT.set()  # if the signal reached submitit's handler first, the running trainer still stops
        log.warning("requeueing %s: the next run resumes from the newest checkpoint", config_path)
        return submitit.helpers.DelayedSubmission(TrainJob(), config_path)


if __name__ == "__main__":
    sys.exit(stage_cli("train", main, None, __doc__ or ""))
