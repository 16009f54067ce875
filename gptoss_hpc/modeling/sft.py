"""config → TRL SFTConfig keyword arguments (pure: golden-testable, no torch import).

``train.extra`` passes any other SFTConfig field through; ``extra_problems`` checks its names against
SFTConfig's dataclass fields at launch (trl is imported only when train.extra is not empty).

Secrets never go in here: ``hub_token`` stays unset and ``push_to_hub`` False (TrainingArguments are pickled
into training_args.bin); the train stage pushes the adapter itself with huggingface_hub, which reads HF_TOKEN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gptoss_hpc.config import derive
from gptoss_hpc.config.schema import RunConfig
from gptoss_hpc.modeling.deepspeed import use_bf16
from gptoss_hpc.paths import PointPaths

DEEPSPEED_JSON = "deepspeed.json"

# SFTConfig fields build_sft_config_kwargs sets, and the key of ours that sets each: train.extra may not set them.
OWNED_FIELDS: dict[str, str] = {
    **{
        k: f"train.{k}"
        for k in (
            "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length", "lr_scheduler_type",
            "weight_decay", "max_grad_norm", "optim", "gradient_checkpointing", "packing", "padding_free",
            "pad_to_multiple_of", "use_liger_kernel", "logging_steps", "save_steps", "save_total_limit", "seed",
            "dataloader_num_workers", "ddp_timeout", "assistant_only_loss", "bf16", "push_to_hub", "hub_model_id",
        )
    },
    "output_dir": "the run directory (logs/<name>/<timestamp>/pNNN/train, set by the launcher)",
    "logging_nan_inf_filter": "nothing: it is false, so a NaN/inf loss is logged as it is",
    "warmup_steps": "train.warmup_ratio",
    "warmup_ratio": "train.warmup_ratio",
    "lr_scheduler_kwargs": "train.min_lr_rate (with lr_scheduler_type=cosine_with_min_lr)",
    "gradient_checkpointing_kwargs": "train.gradient_checkpointing, train.gradient_checkpointing_offload",
    "use_cpu": "cluster.accelerator",
    "accelerator_config": "nothing: batches are copied to the GPU without blocking (cluster.accelerator)",
    "completion_only_loss": "train.assistant_only_loss",
    "data_seed": "data.seed",
    "deepspeed": "train.deepspeed and train.zero",
    "report_to": "WANDB_API_KEY in the environment (W&B on) or nothing (TensorBoard only)",
    "run_name": "name (run names are <name>-<point>[-<overrides>])",
    "hub_token": "HF_TOKEN in the environment (never in a file)",
    "eval_strategy": "the eval stage (stages=[...,eval])",
    "include_num_input_tokens_seen": "nothing (fixed: throughput is computed from it)",
    "save_strategy": "train.save_steps",
    "ddp_find_unused_parameters": "nothing (fixed to False)",
    "disable_tqdm": "nothing (fixed: progress goes to metrics.jsonl)",
}  # fmt: skip


def deepspeed_json_path(paths: PointPaths) -> Path:
    """Where the train stage writes the rendered DeepSpeed JSON (copied into the adapter at the end)."""
    return paths.train / DEEPSPEED_JSON


def wandb_enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("WANDB_API_KEY"))


def report_to(env: Mapping[str, str] | None = None) -> list[str]:
    return ["tensorboard", "wandb"] if wandb_enabled(env) else ["tensorboard"]


def run_name(cfg: RunConfig, paths: PointPaths) -> str:
    """<name>-<point>[-<sweep overrides>], e.g. demo-p001-lora.r=16: readable in W&B and TensorBoard."""
    name = f"{cfg.name}-{paths.root.name}"
    manifest = paths.run_dir / "launch.json"
    try:
        points = json.loads(manifest.read_text()).get("points", [])
    except (OSError, ValueError):
        return name
    for point in points:
        if point.get("dir") == paths.root.name and point.get("overrides"):
            return f"{name}-{','.join(point['overrides'])}"[:128]
    return name


def pad_to_multiple_of(cfg: RunConfig) -> int | None:
    """train.pad_to_multiple_of, or where a static-shape compiled region sees the tokens (compiled layers, the
    compiled fused or MXFP4 experts core: gptoss_hpc.modeling.fast.knobs.compiles_static_shapes) a bound on the
    micro-batch lengths, so that a new length (and a recompile) does not come each step. Packed / padding-free
    micro-batches are one flattened row of at most per_device_train_batch_size x max_length tokens: padded to exactly
    that, one shape (on two H200s the default 1024 stalled 35 s at a new length with a warm inductor cache and over
    5 minutes with a cold one; 8192 = 4 x 2048 did not stall, FACTS). Padded rows: min(max_length, 1024)."""
    from gptoss_hpc.modeling.fast.knobs import compiles_static_shapes

    t = cfg.train
    if t.pad_to_multiple_of is not None:
        return t.pad_to_multiple_of
    if not compiles_static_shapes(cfg):
        return None
    if t.packing or t.padding_free:
        return t.per_device_train_batch_size * derive.max_length(t)
    return min(derive.max_length(t), 1024)


def _checkpointing_kwargs(t: Any) -> dict[str, Any] | None:
    """transformers' checkpointing options: non-reentrant (PEFT + compiled regions need it). The offload of the
    checkpointed inputs (train.gradient_checkpointing_offload) is applied by the speed knobs
    (gptoss_hpc.modeling.fast.offload), not by transformers' own switch."""
    return {"use_reentrant": False} if t.gradient_checkpointing else None


def sft_dataset(dataset: Any) -> Any:
    """Rows of ``messages`` (as gptoss_hpc.data loads them) → TRL's conversational prompt-completion rows:
    the prompt is every turn before the last assistant turn, the completion that turn, so SFTTrainer trains
    the last assistant turn only and renders the rest as Harmony context (gptoss_hpc.data.turns)."""
    from gptoss_hpc.data.turns import prompt_completion

    return dataset.map(
        lambda row: prompt_completion(row["messages"]), remove_columns=dataset.column_names, desc="prompt/completion"
    )


def build_sft_config_kwargs(cfg: RunConfig, paths: PointPaths, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    t = cfg.train
    on_cpu = cfg.cluster.accelerator == "cpu"
    rows, max_length = derive.trl_micro_batch(t)
    kwargs: dict[str, Any] = {
        "output_dir": str(paths.train),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": rows,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_length": max_length,
        # transformers 5: warmup_steps < 1 is a fraction of the total steps (warmup_ratio is gone)
        "warmup_steps": t.warmup_ratio,
        "lr_scheduler_type": t.lr_scheduler_type,
        "lr_scheduler_kwargs": {"min_lr_rate": t.min_lr_rate} if t.lr_scheduler_type == "cosine_with_min_lr" else {},
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "gradient_checkpointing": t.gradient_checkpointing,
        "gradient_checkpointing_kwargs": _checkpointing_kwargs(t),
        "bf16": use_bf16(cfg),
        # On CPU, use_cpu=True is what makes DeepSpeed + gloo work; ACCELERATE_USE_CPU would drop DeepSpeed.
        "use_cpu": on_cpu,
        "assistant_only_loss": t.assistant_only_loss,
        # sft_dataset gives TRL prompt-completion rows: the loss then covers the last assistant turn only
        # (completion mask ∩ assistant mask); assistant_only_loss=false trains on every token, as before.
        "completion_only_loss": t.assistant_only_loss,
        "packing": t.packing,
        "padding_free": t.padding_free,
        "pad_to_multiple_of": pad_to_multiple_of(cfg),
        "use_liger_kernel": t.use_liger_kernel,
        "logging_steps": t.logging_steps,
        # transformers' filter logs a NaN/inf micro-batch loss as the mean of earlier ones, so a diverging run
        # looks healthy; it also costs a host sync per micro-batch
        "logging_nan_inf_filter": False,
        "include_num_input_tokens_seen": "non_padding",
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "data_seed": cfg.data.seed,
        "dataloader_num_workers": t.dataloader_num_workers,
        # pinned batches (dataloader_pin_memory's default) copied without blocking: otherwise each tensor of each
        # micro-batch is a host sync, 12 per optimizer step at 4 micro-batches (docs/BENCHMARKS.md, session 7)
        "accelerator_config": {"non_blocking": not on_cpu},
        "ddp_find_unused_parameters": False,
        "ddp_timeout": t.ddp_timeout,
        "report_to": report_to(env),
        "run_name": run_name(cfg, paths),
        "push_to_hub": False,
        "eval_strategy": "no",
        "disable_tqdm": True,
    }
    if t.deepspeed:
        # Also with one rank: the same engine (and checkpoint layout) as the multi-GPU run.
        kwargs["deepspeed"] = str(deepspeed_json_path(paths))
    kwargs.update(t.extra)  # names checked at launch (extra_problems): none of OWNED_FIELDS
    return kwargs


def extra_problems(extra: Mapping[str, Any]) -> list[str]:
    """One line per train.extra key that is not an SFTConfig field (with close matches) or that a key of ours
    sets (naming that key)."""
    if not extra:
        return []
    import dataclasses
    import difflib

    from trl import SFTConfig

    fields = sorted(f.name for f in dataclasses.fields(SFTConfig) if f.init)
    problems = []
    for key in extra:
        if key in OWNED_FIELDS:
            problems.append(f"train.extra.{key}: SFTConfig's {key} is set by gptoss_hpc; use {OWNED_FIELDS[key]}")
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see trl.SFTConfig for the field names"
            problems.append(f"train.extra.{key}: not a field of trl.SFTConfig; {hint}")
    return problems
