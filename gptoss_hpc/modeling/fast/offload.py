"""``train.gradient_checkpointing_offload``: the checkpointed decoder-layer inputs wait for the backward in host
memory (pinned where there is a GPU) instead of device memory.

With recompute, what autograd keeps between forward and backward is each checkpointed layer's inputs: the part of
activation memory that grows with the row length (docs/BENCHMARKS.md, long rows). ``torch.autograd.graph.save_on_cpu``
around each layer's checkpoint call moves exactly those; the layer recomputed in the backward keeps its own tensors
on the device. transformers >= 5.16 has the same switch (``gradient_checkpointing_kwargs={"offload": True}``), but its
call passes ``pin_memory=True`` without an accelerator, which fails on a CPU-only machine; this wrapper works on both
and does not depend on the transformers version's checkpointing API.
"""

from __future__ import annotations

import functools
from typing import Any

MARK = "_gptoss_offloaded_from"


def offload_checkpoints(model: Any) -> list[Any]:
    """Wrap the checkpoint function of every module that has one (transformers' GradientCheckpointingLayer); returns
    the wrapped modules. Idempotent; ``restore_checkpoints`` undoes it."""
    import torch

    wrapped = []
    for module in model.modules():
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if fn is None or getattr(fn, MARK, None) is not None:
            continue

        @functools.wraps(fn)
        def offloaded(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return _fn(*args, **kwargs)

        setattr(offloaded, MARK, fn)
        module._gradient_checkpointing_func = offloaded
        wrapped.append(module)
    return wrapped


def restore_checkpoints(modules: list[Any]) -> None:
    for module in modules:
        fn = module.__dict__.get("_gradient_checkpointing_func")
        original = getattr(fn, MARK, None)
        if original is not None:
            module._gradient_checkpointing_func = original
