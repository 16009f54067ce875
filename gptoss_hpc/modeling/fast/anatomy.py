"""Model anatomy shared by the knobs: unwrapping PEFT, decoder layers, the lowest trainable layer, class swaps."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FUSED_EXPERTS = "fused_grouped_mm"


_SWAPPED: dict[tuple[str, type], type] = {}


def swap_class(module: Any, name: str, marker: str, namespace: dict[str, Any]) -> bool:
    """Make ``module`` an instance of a subclass of its class with ``namespace`` (its new forward, ...): one
    subclass per (class, ``marker``), so every module so changed shares a compiled region's code, and a class swap
    leaves the module tree, the state dict and PEFT's adapter saving unchanged. The subclass is ``name`` (``{}``:
    the base class's name) and keeps its base at ``<subclass>.<marker>`` for ``restore_class``; a new forward calls
    the one it replaces as ``getattr(type(self), marker).forward(self, ...)``, which stays right when the module is
    swapped again for another marker (``super(type(self), self)`` would then call itself). False (and nothing done)
    when the module is already swapped for ``marker``."""
    cls = type(module)
    if getattr(cls, marker, None) is not None:
        return False
    if (marker, cls) not in _SWAPPED:
        _SWAPPED[marker, cls] = type(name.format(cls.__name__), (cls,), {**namespace, marker: cls})
    module.__class__ = _SWAPPED[marker, cls]
    return True


def restore_class(module: Any, marker: str) -> None:
    """Undo ``swap_class(module, ..., marker, ...)`` (nothing if it was not swapped)."""
    base = getattr(type(module), marker, None)
    if base is not None:
        module.__class__ = base


def unwrap(model: nn.Module) -> nn.Module:
    """PeftModel -> the transformers *ForCausalLM inside it (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder.layers


def lowest_trainable_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer holding a trainable parameter; 0 if anything before the decoder
    layers (the embeddings) trains; len(layers) if no layer trains."""
    base = unwrap(model)
    layers = decoder_layers(model)
    emb = base.get_input_embeddings()
    if emb is not None and any(p.requires_grad for p in emb.parameters()):
        return 0
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(layers)


# torch.compile'd callables and their state, shared by the loss and experts knobs
_COMPILED: dict[str, Any] = {}
