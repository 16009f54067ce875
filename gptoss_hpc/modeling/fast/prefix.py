"""Knob 1: no autograd below the first trainable layer (gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


from gptoss_hpc.modeling.fast.anatomy import decoder_layers, lowest_trainable_layer, swap_class
from gptoss_hpc.modeling.fast.experts import FACTORED_BASE

log = logging.getLogger(__name__)


NO_GRAD_BASE = "_gptoss_no_grad_base"


def _no_grad_forward(self, *args, **kwargs):
    """A decoder layer's forward under torch.no_grad. One class for all such layers (not a per-layer wrapper), so a
    compiled layer's code is shared by all of them."""
    import torch

    with torch.no_grad():
        return getattr(type(self), NO_GRAD_BASE).forward(self, *args, **kwargs)


def freeze_below_first_trainable_layer(model: nn.Module) -> list[nn.Module]:
    """Run decoder layers [0, first trainable) without autograd. Returns the changed layers.

    The hidden state entering the first trainable layer then has no grad history: its backward stops there,
    which is exact, since nothing below it trains (the input embeddings must be frozen; if they train, the
    first trainable "layer" is 0 and nothing changes). Independent of gradient checkpointing.
    """
    first = lowest_trainable_layer(model)
    changed = []
    for layer in list(decoder_layers(model))[:first]:
        if swap_class(layer, "NoGrad{}", NO_GRAD_BASE, {"forward": _no_grad_forward}):
            changed.append(layer)
    log.info("layers 0..%d run without autograd (first trainable layer: %d)", first - 1, first)
    return changed


def _parametrizing_wrappers(layer: nn.Module) -> list[nn.Module]:
    """PEFT ParamWrappers in ``layer`` that register a parametrization in their forward (dynamo cannot trace
    that): all of them but those inside a factored expert-LoRA chain (fast.experts.factor_expert_lora)."""
    factored = set()
    for module in layer.modules():
        if hasattr(type(module), FACTORED_BASE):
            inner = module
            while hasattr(inner, "parameter_name"):
                factored.add(id(inner))
                inner = inner.base_layer
    return [m for m in layer.modules() if hasattr(m, "parameter_name") and id(m) not in factored]


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """Regional torch.compile of the decoder layers. A layer holding a PEFT ParamWrapper that parametrizes in
    its forward stays eager (it still gets the compiled experts core); with the expert LoRA factored
    (``model.fused_experts``) every layer compiles. Identical layers share the compiled code."""

    import torch

    _raise_recompile_limit()
    # layer_idx / sliding_window are ints on the modules: do not compile one graph per layer for them
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    compiled = []
    for layer in decoder_layers(model):
        if _parametrizing_wrappers(layer):
            continue
        layer.compile(dynamic=False, backend=backend)
        compiled.append(layer)
    log.info("compiled %d decoder layers", len(compiled))
    return compiled


def _raise_recompile_limit(limit: int = 256) -> None:
    """Compiled regions see a few variants (sliding/full attention, grad on/off, LoRA or not): the default
    limit of 8 variants per code object is reached with a few micro-batch shapes, and flex_attention past it
    falls back to an eager path that materialises [heads, T, T] scores (16 GiB at 8k tokens)."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 8 * limit)
