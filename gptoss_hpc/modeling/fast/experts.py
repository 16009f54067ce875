"""Knob 4: compiled elementwise around transformers' grouped_mm experts (gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from gptoss_hpc.modeling.fast.anatomy import _COMPILED, FUSED_EXPERTS

log = logging.getLogger(__name__)


def _grouped_mm(x, w, offs):
    """torch's grouped_mm for bf16 on CUDA (also under torch.compile); transformers' dispatcher otherwise (its
    fallback op covers fp32 on CUDA, used by the bench's fp32 check, and CPU). transformers 5.17's dispatcher
    takes the slow per-expert fallback inside torch.compile, so it is not used for bf16 on CUDA."""
    import torch

    if x.is_cuda and w.dtype == torch.bfloat16:
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x.to(w.dtype), w, offs=offs)
    try:
        from transformers.integrations.moe import _grouped_mm as dispatch
    except ImportError:
        dispatch = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return dispatch(x, w, offs=offs)


def moe_experts_core(hidden, top_k_index, top_k_weights, w_gu, b_gu, w_d, b_d, alpha: float, limit: float):
    """gpt-oss experts (interleaved gate/up, clamped SwiGLU, biases) over grouped GEMMs.

    Same arithmetic as transformers' ``grouped_mm_experts_forward`` + ``GptOssExperts._apply_gate``.
    """
    import torch

    num_experts = w_gu.shape[0]
    num_tokens, hidden_dim = hidden.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden[perm // top_k]
    if hidden.device.type == "cuda":
        counts = torch.histc(expert_ids_g.int(), bins=num_experts, min=0, max=num_experts - 1)
    else:
        counts = torch.histc(expert_ids_g.float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = _grouped_mm(x.to(w_gu.dtype), w_gu, offs) + b_gu[expert_ids_g]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    y = _grouped_mm(act, w_d, offs) + b_d[expert_ids_g]
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    out = y[inv_perm].view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden.dtype)


def _compiled_core():
    import torch

    if "core" not in _COMPILED:
        _COMPILED["core"] = torch.compile(moe_experts_core, dynamic=False)
    return _COMPILED["core"]


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers ExpertsInterface entry for ``experts_implementation="fused_grouped_mm"``.

    Weights are read here, outside the compiled region, so PEFT's parametrized (LoRA) expert weights reach
    the compiled core as plain tensors and their gradients flow through grouped_mm's autograd.
    """
    _COMPILED["calls"] = _COMPILED.get("calls", 0) + 1
    args = (
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj,
        self.gate_up_proj_bias,
        self.down_proj,
        self.down_proj_bias,
        float(self.alpha),
        float(self.limit),
    )
    if hidden_states.device.type != "cuda" or _COMPILED.get("disabled"):
        return moe_experts_core(*args)
    try:
        return _compiled_core()(*args)
    except Exception as exc:  # a torch.compile failure must not kill a training run: run it eagerly
        log.warning("compiled experts failed (%s: %s); running them eagerly", type(exc).__name__, exc)
        _COMPILED["disabled"] = True
        return moe_experts_core(*args)


def register_fused_experts() -> None:
    from transformers.integrations import moe

    moe.ALL_EXPERTS_FUNCTIONS._global_mapping[FUSED_EXPERTS] = fused_experts_forward
