"""The router logits of one forward, for the MoE load-balancing loss, without transformers' output-capturing hooks.

TRL (>= 1.16) adds gpt-oss's load-balancing loss by default (``router_aux_loss_coef`` from the architecture, 0.9)
and asks for it with ``output_router_logits=True``. transformers then installs forward hooks on every router,
decoder layer and attention module; each hook reads a ``ContextVar``, which torch.compile cannot trace, so every
compiled decoder layer splits into ~6 graphs with Python between them, which made the MXFP4 train stage
host-bound (docs/BENCHMARKS.md, 2026-11-30, 39f874e). Here each
router keeps the logits of its last forward on itself (an attribute write, which torch.compile traces), and the
loss reads them back in layer order: the same tensors transformers' hooks would collect, in the same order. Only
inside ``recording(routers)``: a checkpointed layer recomputed during the backward must not leave its logits and
their autograd graph on the module (the 120b recompute run on an 80 GiB card peaked 6.5 GiB higher that way).

``load_balancing_loss`` is transformers' ``load_balancing_loss_func`` without its two device-to-host syncs per layer
(torch.histc on CUDA synchronizes; 192 per optimizer step of the 20b bench setting) and in one pass over the layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gptoss_hpc.modeling.fast.anatomy import swap_class

LOGITS_ATTR = "_gptoss_router_logits"
RECORDING_BASE = "_gptoss_recording_base"
ROUTERS_ATTR = "_gptoss_recording_routers"


def _recording_forward(self, hidden_states):
    out = getattr(type(self), RECORDING_BASE).forward(self, hidden_states)
    if type(self)._gptoss_recording:  # a class attribute: torch.compile guards on it (one graph per value)
        setattr(self, LOGITS_ATTR, out[0])
    return out


def _is_router(module: Any) -> bool:
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k")


def recording_routers(model) -> list[Any]:
    """The model's routers in layer order, each made to keep its last logits (``swap_class``, done once). The list
    is kept on ``model``: the loss asks for it at every micro-batch, and walking a 120b model's modules is host
    time on a host-bound step."""
    routers = model.__dict__.get(ROUTERS_ATTR)
    if routers is None:
        routers = [m for m in model.modules() if _is_router(m)]
        for module in routers:
            swap_class(
                module,
                "Recording{}",
                RECORDING_BASE,
                {"forward": _recording_forward, "_gptoss_recording": False},
            )
        model.__dict__[ROUTERS_ATTR] = routers
    return routers


def take_router_logits(routers: list[Any]) -> tuple[Any, ...]:
    """The logits each router recorded since the last call, in layer order; they are dropped from the routers so
    that no forward's tensors outlive its loss."""
    return tuple(module.__dict__.pop(LOGITS_ATTR) for module in routers if LOGITS_ATTR in module.__dict__)


@contextmanager
def recording(routers: list[Any]) -> Iterator[None]:
    """Routers keep their logits only inside this block (the forward whose loss reads them)."""
    classes = {type(m) for m in routers}
    for cls in classes:
        cls._gptoss_recording = True
    try:
        yield
    finally:
        for cls in classes:
            cls._gptoss_recording = False


def load_balancing_loss(router_logits: tuple[Any, ...], num_experts: int, top_k: int, attention_mask=None):
    """Equals ``transformers.models.gpt_oss.modeling_gpt_oss.load_balancing_loss_func`` (Switch Transformer eq. 4-6:
    num_experts x sum over experts of the share of top-k assignments x the mean router probability, over every
    layer's tokens, padding excluded) with the counts by ``scatter_add_``, which never waits for the GPU."""
    import torch

    if not router_logits:
        return 0
    logits = torch.stack([g.to(router_logits[0].device) for g in router_logits])  # [layers, tokens, experts]
    probs = torch.nn.functional.softmax(logits, dim=-1)  # in the logits' dtype, as transformers does
    _, selected = torch.topk(probs, top_k, dim=-1)  # [layers, tokens, top_k]
    layers, tokens = logits.shape[:2]
    if attention_mask is None:
        weight = torch.ones(selected.numel(), dtype=torch.float32, device=logits.device)
        prob_sum = probs.float().sum(dim=(0, 1))
        rows = float(layers * tokens)
    else:
        mask = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)  # [tokens]
        weight = mask[None, :, None].expand(layers, tokens, top_k).reshape(-1)
        prob_sum = (probs.float() * mask[None, :, None]).sum(dim=(0, 1))
        rows = layers * mask.sum()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    counts = counts.scatter_add_(0, selected.reshape(-1), weight)
    return torch.sum((counts / rows) * (prob_sum / rows).unsqueeze(0)) * num_experts
