"""Model anatomy shared by the knobs: unwrapping PEFT, decoder layers, the lowest trainable layer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FUSED_EXPERTS = "fused_grouped_mm"


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
