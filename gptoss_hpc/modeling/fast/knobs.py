"""apply_speed_knobs: turn on the knobs a RunConfig asks for, and undo them (gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from gptoss_hpc.config.schema import RunConfig

from gptoss_hpc.modeling.fast.anatomy import FUSED_EXPERTS, restore_class, unwrap
from gptoss_hpc.modeling.fast.experts import (
    factor_expert_lora,
    register_fused_experts,
    set_compiled_experts,
    unfactor_expert_lora,
)
from gptoss_hpc.modeling.fast.fallback import compile_backend
from gptoss_hpc.modeling.fast.packing import isolate_packed_sequences
from gptoss_hpc.modeling.fast.prefix import (
    NO_GRAD_BASE,
    _raise_recompile_limit,
    compile_decoder_layers,
    freeze_below_first_trainable_layer,
)

log = logging.getLogger(__name__)


@dataclass
class SpeedKnobs:
    """What apply_speed_knobs changed; ``remove()`` restores the stock path (used by the bench's check)."""

    model: Any
    frozen_prefix: list[Any] = field(default_factory=list)
    compiled_layers: list[Any] = field(default_factory=list)
    factored_lora: list[Any] = field(default_factory=list)
    experts_before: str | None = None
    experts_after: str | None = None
    loss_chunk_tokens: int = 0
    offloaded_checkpoints: list[Any] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "no_grad_layers": len(self.frozen_prefix),
            "compiled_layers": len(self.compiled_layers),
            "experts_implementation": self.experts_after,
            "factored_expert_lora": len(self.factored_lora),
            "loss_chunk_tokens": self.loss_chunk_tokens,
            "offloaded_checkpoints": len(self.offloaded_checkpoints),
        }

    def remove(self) -> None:
        from gptoss_hpc.modeling.fast.offload import restore_checkpoints

        restore_checkpoints(self.offloaded_checkpoints)
        self.offloaded_checkpoints = []
        for layer in self.frozen_prefix:
            restore_class(layer, NO_GRAD_BASE)
        self.frozen_prefix = []
        for layer in self.compiled_layers:
            layer._compiled_call_impl = None
        self.compiled_layers = []
        unfactor_expert_lora(self.factored_lora)
        self.factored_lora = []
        if self.experts_before is not None or self.experts_after is not None:
            set_experts_implementation(self.model, self.experts_before)
            self.experts_after = self.experts_before
        self.loss_chunk_tokens = 0


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def set_experts_implementation(model: nn.Module, name: str | None) -> None:
    """Switch the experts kernel of an already built model (all layers share one config object)."""
    if name == FUSED_EXPERTS:
        register_fused_experts()
    config = unwrap(model).config
    config._experts_implementation = name
    for module in unwrap(model).modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not config and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = name


def compiles_layers(cfg: RunConfig) -> bool:
    """Whether the decoder layers get compiled: ``model.compile_layers`` without gradient checkpointing (the
    measured setting; checkpointed layers under torch.compile were not measured)."""
    return bool(getattr(cfg.model, "compile_layers", False)) and not getattr(cfg.train, "gradient_checkpointing", False)


def compiles_static_shapes(cfg: RunConfig) -> bool:
    """Whether a region compiled with static shapes (``dynamic=False``) sees each micro-batch's token count: the
    compiled layers, the fused experts' core when it is compiled (not under checkpointing), and the MXFP4 experts'
    core, which compiles on CUDA with or without checkpointing. Then a new micro-batch length is a recompile (on the
    H200, fit:20b@24 with MXFP4 and recompute lost ~12 s per new length: docs/BENCHMARKS.md, session 6)."""
    if compiles_layers(cfg):
        return True
    m, t = cfg.model, cfg.train
    on_gpu = getattr(cfg.cluster, "accelerator", "gpu") == "gpu"
    if on_gpu and getattr(m, "experts_dtype", "bfloat16") == "mxfp4":
        return True
    return on_gpu and bool(getattr(m, "fused_experts", False)) and not getattr(t, "gradient_checkpointing", False)


def apply_speed_knobs(model: nn.Module, cfg: RunConfig) -> SpeedKnobs:
    """Apply the knobs that ``cfg`` turns on, to a model that already has its LoRA adapters and gradient
    checkpointing set up. ``model.fused_experts`` swaps in the compiled experts (the model is built with
    ``experts_implementation=grouped_mm``) with the expert LoRA factored into them;
    ``train.no_grad_below_first_lora`` runs the frozen prefix without autograd; ``model.compile_layers``
    compiles the decoder layers (CUDA); ``train.loss_chunk_tokens`` is recorded here and applied by
    ``causal_lm_loss`` in the loss."""
    t, m = cfg.train, cfg.model
    if getattr(t, "packing", False) or getattr(t, "padding_free", False):
        isolate_packed_sequences(model)  # a correctness fix, kept by remove()
    knobs = SpeedKnobs(model=model, loss_chunk_tokens=int(getattr(t, "loss_chunk_tokens", 0) or 0))
    if getattr(m, "fused_experts", False):
        knobs.experts_before = getattr(unwrap(model).config, "_experts_implementation", None)
        if knobs.experts_before == FUSED_EXPERTS:
            knobs.experts_before = "grouped_mm"
        set_experts_implementation(model, FUSED_EXPERTS)
        knobs.experts_after = FUSED_EXPERTS
        checkpointing = bool(getattr(t, "gradient_checkpointing", False))
        set_compiled_experts(not checkpointing)
        if checkpointing:
            log.warning(
                "model.fused_experts runs its core eagerly with train.gradient_checkpointing=true (compiled, it "
                "recompiled per micro-batch shape on the H200: ~100 s per step; docs/BENCHMARKS.md)"
            )
        knobs.factored_lora = factor_expert_lora(model)
    if getattr(m, "experts_dtype", "bfloat16") == "mxfp4":
        from gptoss_hpc.modeling.fast.mxfp4_experts import release_placeholders

        # MXFP4 experts read their frozen W only through the factored LoRA, with or without fused_experts
        knobs.factored_lora = knobs.factored_lora or factor_expert_lora(model)
        release_placeholders(model)
    if getattr(t, "no_grad_below_first_lora", False):
        knobs.frozen_prefix = freeze_below_first_trainable_layer(model)
    if t.gradient_checkpointing and t.gradient_checkpointing_offload:
        from gptoss_hpc.modeling.fast.offload import offload_checkpoints

        knobs.offloaded_checkpoints = offload_checkpoints(model)
    backend = compile_backend(next(model.parameters()).device.type)
    if compiles_layers(cfg) and backend is not None:
        knobs.compiled_layers = compile_decoder_layers(model, backend=backend)
    elif getattr(m, "compile_layers", False) and getattr(t, "gradient_checkpointing", False):
        log.warning(
            "model.compile_layers leaves the layers eager with train.gradient_checkpointing=true (that pair was never "
            "measured, docs/BENCHMARKS.md); train=default turns checkpointing off"
        )
    if knobs.experts_after or knobs.compiled_layers:
        _raise_recompile_limit()
    log.info("speed knobs: %s", knobs.summary())
    return knobs
