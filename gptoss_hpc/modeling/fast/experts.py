"""Knob 4: compiled elementwise around transformers' grouped_mm experts, with the expert LoRA factored into them
(gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import logging
from typing import Any

from gptoss_hpc.modeling.fast.anatomy import _COMPILED, FUSED_EXPERTS, restore_class, swap_class
from gptoss_hpc.modeling.fast.fallback import call_compiled, compile_backend
from gptoss_hpc.modeling.fast.grouped_mm import grouped_mm as _grouped_mm

log = logging.getLogger(__name__)


def _expert_mm(x, w, offs, dtype):
    """x @ W_e per expert group; ``w`` is the [E, in, out] weight or MXFP4 (blocks, scales) dequantized just in
    time (gptoss_hpc.modeling.mxfp4.experts)."""
    if isinstance(w, tuple):
        from gptoss_hpc.modeling.mxfp4.matmul import mxfp4_grouped_mm

        return mxfp4_grouped_mm(x, *w, offs, dtype)
    return _grouped_mm(x.to(w.dtype), w, offs)


def _lora_delta(t, expert_ids_g, num_experts: int, right, scale: float):
    """The second LoRA factor per row: ``t`` [N, E*r] holds x @ A_e for every expert e; each row keeps its own
    expert's block (a one-hot mask; rows are sorted by expert) and is multiplied by the stacked B [E*r, out]."""
    import torch

    n, er = t.shape
    own = expert_ids_g[:, None] == torch.arange(num_experts, device=t.device)[None, :]
    t = (t.view(n, num_experts, er // num_experts) * own[:, :, None].to(t.dtype)).view(n, er)
    return (t @ right) * scale


def moe_experts_core(
    hidden,
    top_k_index,
    top_k_weights,
    w_gu,
    b_gu,
    w_d,
    b_d,
    alpha: float,
    limit: float,
    lora_gu=None,
    lora_d=None,
):
    """gpt-oss experts (interleaved gate/up, clamped SwiGLU, biases) over grouped GEMMs.

    Same arithmetic as transformers' ``grouped_mm_experts_forward`` + ``GptOssExperts._apply_gate``. With
    ``lora_gu`` / ``lora_d`` = (left [in, E*r], right [E*r, out], scale) from ``expert_lora_factors``, each
    projection is x @ W_e + scale * (x @ A_e) @ B_e. PEFT's parametrization instead builds W + scale * A_e @ B_e
    for the whole [E, in, out] stack every forward and back-propagates into it (a weight-sized gradient); here
    the frozen W is used as it is and the LoRA costs two thin GEMMs. It also keeps the adapter's contribution
    out of W's bf16 rounding.
    """
    import torch

    num_experts = b_gu.shape[0]
    num_tokens, hidden_dim = hidden.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    token_of_row = perm // top_k
    x = hidden[token_of_row]
    if hidden.device.type == "cuda":
        counts = torch.histc(expert_ids_g.int(), bins=num_experts, min=0, max=num_experts - 1)
    else:
        counts = torch.histc(expert_ids_g.float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = _expert_mm(x, w_gu, offs, b_gu.dtype) + b_gu[expert_ids_g]
    if lora_gu is not None:
        left, right, scale = lora_gu
        # x @ A for every expert, once per token (not once per routed copy of it)
        t = (hidden.to(left.dtype) @ left)[token_of_row]
        gate_up = gate_up + _lora_delta(t, expert_ids_g, num_experts, right, scale).to(gate_up.dtype)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    y = _expert_mm(act, w_d, offs, b_d.dtype) + b_d[expert_ids_g]
    if lora_d is not None:
        left, right, scale = lora_d
        t = act.to(left.dtype) @ left
        y = y + _lora_delta(t, expert_ids_g, num_experts, right, scale).to(y.dtype)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    out = y[inv_perm].view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden.dtype)


def _compiled_core(backend: str = "inductor"):
    import torch

    key = "core" if backend == "inductor" else f"core:{backend}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(moe_experts_core, dynamic=False, backend=backend)
    return _COMPILED[key]


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights, lora: dict[str, Any] | None = None):
    """transformers ExpertsInterface entry for ``experts_implementation="fused_grouped_mm"``.

    Weights are read here, outside the compiled region, so PEFT's parametrized (LoRA) expert weights reach
    the compiled core as plain tensors and their gradients flow through grouped_mm's autograd. ``lora``
    (from ``FactoredLoraExperts``) holds the factors of the expert LoRA instead, with W left unparametrized.
    """
    lora = lora or {}
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
        lora.get("gate_up_proj"),
        lora.get("down_proj"),
    )
    backend = compile_backend(hidden_states.device.type)
    if backend is None or _COMPILED.get("disabled") or _COMPILED.get("eager_by_config"):
        return moe_experts_core(*args)
    # checkpointing's early stop passes through call_compiled untouched (it is not a compile failure)
    return call_compiled(
        _compiled_core(backend), moe_experts_core, args, what="experts", flag="disabled", state=_COMPILED
    )


def set_compiled_experts(enabled: bool) -> None:
    """Whether the fused experts core runs compiled (the default) or eagerly. Eager under gradient checkpointing:
    on the H200 the compiled core with train=reference (checkpointing, unpacked rows of varying length) took
    ~100 s per 16k-token optimizer step, a recompile per new shape (docs/BENCHMARKS.md, GPU check run 2)."""
    _COMPILED["eager_by_config"] = not enabled


def expert_lora_factors(wrapper, adapter: str, dtype):
    """(left [in, E*r], right [E*r, out], scale) of a PEFT ``ParamWrapper`` on a 3-D expert weight [E, in, out]:
    scale * left[:, e*r:(e+1)*r] @ right[e*r:(e+1)*r] equals ``wrapper.get_delta_weight(adapter)[e]``
    (tests/test_fast_path.py). The index arithmetic mirrors PEFT's ``get_delta_weight``: lora_A's rows are
    expert-major, lora_B's columns rank-major."""
    a = wrapper.lora_A[adapter].weight  # [E*r, in']
    b = wrapper.lora_B[adapter].weight  # [out', r*E]
    num_experts = wrapper.num_experts
    a = a.reshape(num_experts, -1, a.shape[-1])  # [E, r, in']
    b = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)  # [E, out', r]
    if wrapper._did_swap_in_out_features:  # PEFT: einsum("o r e, e r i -> e o i"), delta[e] = B_e @ A_e
        lhs, rhs = b, a
    else:  # einsum("o r e, e r i -> e i o"), delta[e] = A_e^T @ B_e^T
        lhs, rhs = a.transpose(-2, -1), b.transpose(-2, -1)
    e, d_in, r = lhs.shape
    left = lhs.permute(1, 0, 2).reshape(d_in, e * r)
    right = rhs.reshape(e * r, rhs.shape[-1])
    return left.to(dtype), right.to(dtype), float(wrapper.scaling[adapter])


_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _factored_plan(outer):
    """(experts module, {param name: (wrapper, adapter)}) when the factored path applies to this chain of PEFT
    ParamWrappers; None sends the call to PEFT (adapters disabled or merged, several adapters, other params,
    experts not on the fused implementation)."""
    chain = {}
    module = outer
    while hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
        if module.disable_adapters or module.merged or module.parameter_name not in _EXPERT_PARAMS:
            return None
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if len(adapters) != 1 or module.num_experts < 2:
            return None
        chain[module.parameter_name] = (module, adapters[0])
        module = module.base_layer
    config = getattr(module, "config", None)
    if getattr(module, "takes_factored_lora", False):  # MXFP4 experts (mxfp4/experts.py)
        return module, chain
    if getattr(config, "_experts_implementation", None) != FUSED_EXPERTS or not hasattr(module, "alpha"):
        return None
    return module, chain


def _factored_forward(self, hidden_states, *args, **kwargs):
    plan = _factored_plan(self) if not kwargs else None
    if plan is None:
        return getattr(type(self), FACTORED_BASE).forward(self, hidden_states, *args, **kwargs)
    experts, chain = plan
    dtype = experts.gate_up_proj.dtype
    lora = {name: expert_lora_factors(w, adapter, dtype) for name, (w, adapter) in chain.items()}
    if getattr(experts, "takes_factored_lora", False):
        return experts(hidden_states, *args, lora=lora)
    return fused_experts_forward(experts, hidden_states, *args, lora=lora)


FACTORED_BASE = "_gptoss_factored_base"


def factor_expert_lora(model) -> list[Any]:
    """Route every PEFT LoRA on gpt-oss expert weights (the outermost ParamWrapper of each experts module)
    through ``moe_experts_core``'s factored LoRA. Returns the changed wrappers; ``unfactor_expert_lora`` undoes it.
    A class swap (``swap_class``), so the module tree, the state dict and PEFT's adapter saving are unchanged."""
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    inner = {id(w.base_layer) for w in wrappers}
    changed = []
    for module in wrappers:
        if id(module) in inner or _factored_plan(module) is None:
            continue
        if swap_class(module, "FactoredLoraExperts", FACTORED_BASE, {"forward": _factored_forward}):
            changed.append(module)
    log.info("expert LoRA factored on %d experts modules", len(changed))
    return changed


def unfactor_expert_lora(wrappers: list[Any]) -> None:
    for module in wrappers:
        restore_class(module, FACTORED_BASE)


def register_fused_experts() -> None:
    from transformers.integrations import moe

    moe.ALL_EXPERTS_FUNCTIONS._global_mapping[FUSED_EXPERTS] = fused_experts_forward
