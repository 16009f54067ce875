"""SFT train stage: LoRA on gpt-oss with TRL's SFTTrainer (+ DeepSpeed ZeRO), one sweep point per job.

    python -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml
    torchrun --nproc_per_node=2 -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml
    srun --ntasks-per-node=8 python -m gptoss_hpc.stages.train logs/demo/20261125-081500/p000/config.yaml

Ranks come from torchrun's env, else from Slurm/submitit (``TorchDistributedEnvironment``), else one
process. A re-run resumes from the newest complete ``train/checkpoint-N``. On ``cluster.preempt_signal``
(SIGUSR2 by default, or SIGTERM: Slurm's warning before the time limit, or preemption) every rank finishes
its step, a checkpoint is saved, and under the launcher (``stages.train_job.TrainJob``) the job requeues itself up to
``cluster.max_requeues`` times (stages/requeue.py); run by hand it exits non-zero saying how to resume.

Outputs (rank 0): ``adapter/`` (adapter safetensors + config, tokenizer, deepspeed.json), ``metrics.jsonl``
(one JSON line per logging step), ``train_metrics.json``, TensorBoard in ``train/runs/``; W&B only when
WANDB_API_KEY is set; a Hub push of the adapter when HF_TOKEN is set, train.push_to_hub is true and
PUSH_TO_HUB is not "false". A W&B or Hub failure is a warning (status/train.json "warnings"), never a failed
run: W&B falls back to offline files under ``wandb/`` (``wandb sync`` them later), then to TensorBoard only.

On an error a rank tears down without any collective and exits non-zero; srun's --kill-on-bad-exit then ends
the other ranks (see modeling/distributed.py). Test-only fault hook: ``GPTOSS_HPC_TEST_RAISE_AT=<rank>:<step>``
makes that rank raise InjectedFault at the end of that optimizer step (the fault tests use it).
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
from pathlib import Path
from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.modeling.distributed import (
    DIST_ENV,
    abort_distributed,
    collective_timeout_s,
    rank_hostnames,
    set_collective_timeout,
    setup_distributed,
    shutdown_distributed,
)
from gptoss_hpc.modeling.hub import push_folder
from gptoss_hpc.modeling.profiling import profile_callback
from gptoss_hpc.modeling.tracking import finish_wandb, start_wandb
from gptoss_hpc.modeling.trainer import trainer_class
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.checkpoints import latest_checkpoint
from gptoss_hpc.stages.common import run_stage, stage_cli, stage_warning
from gptoss_hpc.stages.requeue import (
    preempt_signum,
)
from gptoss_hpc.stages.train_callbacks import Preempted, on_preempt_signal, train_callbacks

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
        signal.signal(preempt_signum(cfg.cluster), on_preempt_signal)
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
    from trl import SFTTrainer

    from gptoss_hpc.config.lengths import with_length
    from gptoss_hpc.data import load_data
    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.sft import deepspeed_json_path, sft_dataset
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
    if cfg.train.max_length is None:  # a config no launch resolved (run by hand): the length the data asked for
        cfg = with_length(cfg, loaded.stats["max_length"], ())
    train_ds = sft_dataset(loaded.train)  # loss on each row's last assistant turn
    _drop_none_turn_keys(tokenizer)

    args, deepspeed, batch = _sft_args(cfg, paths, dist_info["world_size"], rank0)

    profile_cb = profile_callback(paths.train)  # a bad GPTOSS_HPC_PROFILE_STEPS fails here, before the model loads
    model = load_base_model(cfg, paths, for_training=True)
    cbs = train_callbacks(cfg, paths, dist_info["world_size"], profile_cb)
    trainer_cls = trainer_class(SFTTrainer, cfg, dist_info["world_size"], deepspeed)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=None,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
        callbacks=cbs.all,
    )
    set_collective_timeout(cfg.train.ddp_timeout)
    if cfg.model.experts_dtype == "mxfp4":
        from gptoss_hpc.modeling.mxfp4.experts import release_placeholders

        release_placeholders(trainer.model)  # before DeepSpeed's broadcast of every parameter (train() wraps)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.4f%%)", trainable, total, 100 * trainable / total)

    resume = latest_checkpoint(paths.train)
    if resume is not None:
        log.info("resuming from %s", resume)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    engine = _engine_facts(trainer)

    if cbs.preemption.triggered:
        saved = latest_checkpoint(paths.train)
        raise Preempted(str(saved) if saved else None, trainer.state.global_step)

    trainer.save_model(str(paths.adapter))  # every rank calls it; rank 0 writes adapter + tokenizer
    metrics: dict[str, Any] = {}
    if rank0:
        if deepspeed:
            shutil.copy2(deepspeed_json_path(paths), paths.adapter / "deepspeed.json")
        losses = cbs.metrics.losses
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
            "world_size": dist_info["world_size"],
            "rank_source": dist_info["source"],
            "trainable_params": trainable,
            "total_params": total,
            "train_rows": len(train_ds),
            **engine,
            "speed_knobs": cbs.knobs.summary if cbs.knobs is not None else None,
            "batch": batch,
            "hub_repo": None,
            "hub_push": None,
        }
        finish_wandb()
        write_atomic(paths.train_metrics, json.dumps(metrics, indent=2) + "\n")
        _push_adapter(cfg, paths, metrics)
    return metrics


def _sft_args(cfg: RunConfig, paths: PointPaths, world_size: int, rank0: bool) -> tuple[Any, bool, dict[str, Any]]:
    """SFTConfig for this point (with its DeepSpeed JSON written, and W&B started on rank 0), whether DeepSpeed
    runs, and the batch facts every rank agrees on."""
    from trl import SFTConfig

    from gptoss_hpc.modeling.batch_facts import check_batch_facts
    from gptoss_hpc.modeling.deepspeed import render_deepspeed_config
    from gptoss_hpc.modeling.sft import build_sft_config_kwargs, deepspeed_json_path, wandb_enabled

    kwargs = build_sft_config_kwargs(cfg, paths)
    if "deepspeed" in kwargs:
        ds_config = render_deepspeed_config(cfg, world_size)
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
    return args, "deepspeed" in kwargs, batch


def _push_adapter(cfg: RunConfig, paths: PointPaths, metrics: dict[str, Any]) -> None:
    """The optional Hub push of the saved adapter, recorded in train_metrics.json; a failure is a warning."""
    try:
        metrics["hub_repo"] = push_folder(cfg, paths, paths.adapter, what="adapter")
        metrics["hub_push"] = "pushed" if metrics["hub_repo"] else None
    except GptossHpcError as exc:  # the adapter is saved: a push that failed must not fail the run
        metrics["hub_push"] = f"push failed: {exc}"
        stage_warning(metrics["hub_push"])
    if metrics["hub_push"]:
        write_atomic(paths.train_metrics, json.dumps(metrics, indent=2) + "\n")


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


if __name__ == "__main__":
    sys.exit(stage_cli("train", main, None, __doc__ or ""))
