"""config → peft.LoraConfig. MoE experts are fused 3-D parameters, so they go through PEFT's
``target_parameters`` ("<layer>.mlp.experts.gate_up_proj"); attention projections through ``target_modules``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptoss_hpc.config.derive import target_parameters
from gptoss_hpc.config.schema import RunConfig

if TYPE_CHECKING:
    import peft

# gpt-oss's nn.Linear layers besides lm_head. The router (GptOssTopKRouter) is a bare parameter, not a
# Linear: LoRA on it would also perturb routing, so "all-linear" means the attention projections, and
# lm_head stays frozen as in PEFT's own "all-linear".
GPT_OSS_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj"]


def resolve_target_modules(target_modules: object) -> list[str] | None:
    if target_modules is None or target_modules == []:
        return None
    if target_modules == "all-linear":
        return list(GPT_OSS_LINEAR)
    return [str(m) for m in target_modules]  # type: ignore[union-attr]


def lora_kwargs(cfg: RunConfig) -> dict:
    """The LoraConfig arguments as plain data (golden-testable)."""
    lo = cfg.lora
    params = target_parameters(lo, cfg.model)
    return {
        "r": lo.r,
        "lora_alpha": lo.lora_alpha,
        "lora_dropout": lo.lora_dropout,
        "bias": lo.bias,
        "use_rslora": lo.use_rslora,
        "target_modules": resolve_target_modules(lo.target_modules) or [],
        "target_parameters": params or None,
        "task_type": "CAUSAL_LM",
    }


def build_lora_config(cfg: RunConfig) -> peft.LoraConfig:
    from peft import LoraConfig

    return LoraConfig(**lora_kwargs(cfg))
