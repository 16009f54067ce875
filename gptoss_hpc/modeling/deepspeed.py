"""config → DeepSpeed JSON (pure). "auto" where the HF Trainer fills values from SFTConfig, so batch size,
accumulation and clipping have one source of truth; no "optimizer"/"scheduler" block, so the HF optimizer
and scheduler are used (and DeepSpeed does not JIT-compile fused_adam)."""

from __future__ import annotations

from typing import Any

from gptoss_hpc.config.schema import RunConfig


def use_bf16(cfg: RunConfig) -> bool:
    """bf16 autocast only on GPUs: on CPU fp32 is faster and SFTConfig(bf16) would mismatch DeepSpeed."""
    return bool(cfg.train.bf16 and cfg.cluster.accelerator == "gpu")


def render_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The JSON for a run of ``world_size`` ranks (train.zero.overlap_comm unset: on only with several ranks)."""
    z = cfg.train.zero
    overlap = z.overlap_comm if z.overlap_comm is not None else world_size > 1
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": overlap,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_scatter": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_partitions": True,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.accelerator == "gpu"}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
