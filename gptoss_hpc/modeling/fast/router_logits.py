"""The router logits of one forward, for the MoE load-balancing loss, without transformers' output-capturing hooks.

TRL (>= 1.16) adds gpt-oss's load-balancing loss by default (``router_aux_loss_coef`` from the architecture, 0.9)
and asks for it with ``output_router_logits=True``. transformers then installs forward hooks on every router,
decoder layer and attention module; each hook reads a ``ContextVar``, which torch.compile cannot trace, so every
compiled decoder layer splits into ~6 graphs with Python between them. On the H200 that made the MXFP4 20b train
stage host-bound: 64% device busy, 0.88 of the bench's throughput (docs/BENCHMARKS.md, session 7). Here each
router keeps the logits of its last forward on itself (an attribute write, which torch.compile traces), and the
loss reads them back in layer order: the same tensors transformers' hooks would collect, in the same order.
"""

from __future__ import annotations

from typing import Any

LOGITS_ATTR = "_gptoss_router_logits"
_RECORDING_CLASSES: dict[type, type] = {}


def _recording_forward(self, hidden_states):
    out = super(type(self), self).forward(hidden_states)
    setattr(self, LOGITS_ATTR, out[0])
    return out


def _is_router(module: Any) -> bool:
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k")


def recording_routers(model) -> list[Any]:
    """The model's routers in layer order, each made to keep its last logits (a class swap, done once; the module
    tree and state dict are unchanged)."""
    routers = [m for m in model.modules() if _is_router(m)]
    for module in routers:
        cls = type(module)
        if getattr(cls, "_gptoss_recording_base", None) is not None:
            continue
        if cls not in _RECORDING_CLASSES:
            _RECORDING_CLASSES[cls] = type(
                f"Recording{cls.__name__}", (cls,), {"forward": _recording_forward, "_gptoss_recording_base": cls}
            )
        module.__class__ = _RECORDING_CLASSES[cls]
    return routers


def take_router_logits(routers: list[Any]) -> tuple[Any, ...]:
    """The logits each router recorded since the last call, in layer order; they are dropped from the routers so
    that no forward's tensors outlive its loss."""
    return tuple(module.__dict__.pop(LOGITS_ATTR) for module in routers if LOGITS_ATTR in module.__dict__)
