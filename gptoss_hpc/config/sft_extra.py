"""``train.extra``: the SFTConfig fields a user may pass through, checked at launch by ``validate``.

Lives in config/ (validation is config's job) and imports trl only inside ``extra_problems``, only when
train.extra is not empty: importing the config package stays cheap and never reaches the modeling layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# SFTConfig fields modeling.sft.build_sft_config_kwargs sets, and the key of ours that sets each: train.extra
# may not set them.
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
