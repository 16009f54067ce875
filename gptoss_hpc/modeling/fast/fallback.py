"""When a compiled knob may fall back to eager, and which torch.compile backend runs where (gptoss_hpc.modeling.fast).

Only a *compile* failure (a ``torch._dynamo`` / inductor error) falls back, and only outside activation
checkpointing. Everything else propagates: in particular torch.utils.checkpoint's ``_StopRecomputationError``,
the control-flow exception non-reentrant checkpointing raises through the forward it recomputes once it has the
tensors it needs. Swallowing it and re-running the experts eagerly crashed every step of gradient-checkpointed
training on the H200 (``AssertionError: Unexpected state: target_frame.early_stop is set``). Under checkpointing a
fallback is also unsafe by itself: the recomputation must save the same tensors as the first forward did, and the
eager path saves different ones; there a compile failure is raised with the fix instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

# CPU has no use for the compiled knobs (they exist for the GPU); tests set a backend here (aot_eager, inductor)
# to run the same compiled code paths on CPU. Unset: the knobs run eagerly on CPU.
CPU_BACKEND_ENV = "GPTOSS_HPC_CPU_COMPILE_BACKEND"


def compile_backend(device_type: str) -> str | None:
    """The torch.compile backend for a knob on this device; None = run it eagerly."""
    if device_type == "cuda":
        return "inductor"
    return os.environ.get(CPU_BACKEND_ENV) or None


def saved_tensor_hooks_active() -> bool:
    """True inside torch.utils.checkpoint (non-reentrant) or any other saved-tensors hooks context."""
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


def is_compile_failure(exc: BaseException) -> bool:
    """Raised by dynamo/AOT autograd/inductor while compiling (never checkpointing's control flow, an OOM or a
    shape error of the eager code: those are the same eagerly and must propagate)."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def call_compiled(
    compiled: Callable[..., Any], eager: Callable[..., Any], args: tuple, *, what: str, flag: str, state: dict
) -> Any:
    """``compiled(*args)``; on a compile failure outside checkpointing, warn once, set ``state[flag]`` (later calls
    go eager) and return ``eager(*args)``. Any other exception propagates unchanged."""
    try:
        return compiled(*args)
    except Exception as exc:
        if not is_compile_failure(exc):
            raise
        if saved_tensor_hooks_active():
            raise GptossHpcError(
                f"torch.compile of the {what} failed under activation checkpointing ({type(exc).__name__}: {exc}); "
                "an eager fallback there would recompute different tensors than the forward saved. Set "
                "model.fused_experts=false, or train.gradient_checkpointing=false"
            ) from exc
        log.warning("compiled %s failed (%s: %s); running them eagerly", what, type(exc).__name__, exc)
        state[flag] = True
        return eager(*args)
