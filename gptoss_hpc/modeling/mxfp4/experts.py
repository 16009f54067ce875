"""gpt-oss experts with MXFP4-resident weights (``model.experts_dtype: mxfp4``; format in mxfp4/format.py).

Each layer keeps the checkpoint's uint8 blocks and scales (a quarter of the bf16 bytes, plus 1/32 for the scales)
and dequantizes its whole expert stack just in time, inside a grouped-GEMM custom op: once in the forward and
once more in its backward for the input gradient. The bf16 stack is never saved for backward, so one layer's is
alive at a time (the caching allocator hands the same block to the next layer). The frozen W needs no gradient;
the expert LoRA stays factored (x@W + s(x@A)@B, gptoss_hpc.modeling.fast.experts), so W is only ever read.
Routing, bias, SwiGLU and combine are the fused experts' (``moe_experts_core``), compiled the same way on CUDA;
the dequant (integer ops, one elementwise pass) is compiled on its own inside the op.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.fast.anatomy import _COMPILED
from gptoss_hpc.modeling.mxfp4.format import BLOCK, EXPERT_PARAMS, SCALE_BIAS, dequantize_mxfp4
from gptoss_hpc.modeling.mxfp4.matmul import _compile, _compiles

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's values (the constants of transformers' GptOssExperts)

log = logging.getLogger(__name__)


class Mxfp4Experts(nn.Module):
    """Drop-in for transformers' ``GptOssExperts`` (same forward signature, same state-dict names as the Hub's
    MXFP4 checkpoint: ``{gate_up,down}_proj_{blocks,scales,bias}``).

    ``gate_up_proj`` / ``down_proj`` are placeholders: a single element expanded to the bf16 weight's shape, so
    PEFT's ``target_parameters`` can wrap them (it reads their shape, dtype and device) and ``FactoredLoraExperts``
    hands the LoRA factors to ``forward(..., lora=...)``. Their values are never read."""

    takes_factored_lora = True
    # what transformers' @use_experts_implementation sets on GptOssExperts: PEFT reads is_transposed to lay out
    # the expert LoRA (the weights are [E, in, out])
    is_transposed = True
    is_concatenated = False
    has_bias = True

    def __init__(self, config):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        if h % BLOCK or i % BLOCK:
            raise GptossHpcError(f"MXFP4 experts need hidden_size and intermediate_size divisible by {BLOCK}")
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.config = config
        # the Hub's config.json has swiglu_limit but no swiglu_alpha, and transformers 5.17's GptOssConfig has no
        # default for it (its experts use the constant 1.702): the H200 box failed to build the model without these
        self.alpha = getattr(config, "swiglu_alpha", SWIGLU_ALPHA)
        self.limit = getattr(config, "swiglu_limit", SWIGLU_LIMIT)
        # Not persistent: the frozen experts are the base checkpoint's, never training state. As persistent buffers
        # every DeepSpeed checkpoint carried them (exclude_frozen_parameters drops frozen parameters, not buffers):
        # ~61 GB per save for 120b, which filled the H200 box's disk at the final save and lost the run.
        for name, d_in, d_out in (("gate_up_proj", h, 2 * i), ("down_proj", i, h)):
            blocks = torch.zeros(e, d_out, d_in // BLOCK, BLOCK // 2, dtype=torch.uint8)
            self.register_buffer(f"{name}_blocks", blocks, persistent=False)
            scales = torch.full((e, d_out, d_in // BLOCK), SCALE_BIAS, dtype=torch.uint8)
            self.register_buffer(f"{name}_scales", scales, persistent=False)
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(e, d_out), requires_grad=False))
        # on the meta device while transformers builds and initialises the model (its _init_weights sees this class
        # as GptOssExperts and writes to them); the builders in gptoss_hpc.modeling.mxfp4.model reset them after
        self.reset_placeholders(torch.device("meta"))

    def reset_placeholders(self, device: torch.device | None = None) -> None:
        """(Re)create the placeholders in the biases' dtype, on the blocks' device unless ``device`` is given."""
        dtype, device = self.gate_up_proj_bias.dtype, device or self.gate_up_proj_blocks.device
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        for name, shape in (("gate_up_proj", (e, h, 2 * i)), ("down_proj", (e, i, h))):
            placeholder = torch.zeros((), dtype=dtype, device=device).expand(shape)
            if name in self._parameters or not hasattr(self, name):
                param = nn.Parameter(placeholder, requires_grad=False)
                # transformers' _init_weights (GptOssExperts is this class while a model is built) skips it
                param._is_hf_initialized = True
                self._parameters[name] = param
            else:
                object.__setattr__(self, name, placeholder)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in EXPERT_PARAMS:  # placeholders hold no weights: state dicts keep the checkpoint's layout
            destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        for name in EXPERT_PARAMS:
            if prefix + name in missing:
                missing.remove(prefix + name)

    def placeholders_as_attributes(self) -> None:
        """Take the placeholders out of the parameter list once PEFT has wrapped them, so DeepSpeed's broadcast,
        state dicts and parameter counts see only real tensors (PEFT keeps reading them as attributes)."""
        for name in EXPERT_PARAMS:
            value = self._parameters.pop(name, None)
            if value is not None:
                object.__setattr__(self, name, value.detach())

    @torch.no_grad()
    def fill_random(self, generator: torch.Generator) -> None:
        """Random blocks (every e2m1 code equally likely) and scales 2**-8..2**-6: |w| ~ 0.02 on average, the
        scale of transformers' random init. In place, on the buffers' device."""
        for name in EXPERT_PARAMS:
            getattr(self, f"{name}_blocks").random_(0, 256, generator=generator)
            getattr(self, f"{name}_scales").random_(SCALE_BIAS - 8, SCALE_BIAS - 5, generator=generator)

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [E, in, out] weight of ``name`` as the bf16 model holds it (contiguous copy; for tests and merges)."""
        dtype = dtype or self.gate_up_proj_bias.dtype
        blocks, scales = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
        return dequantize_mxfp4(blocks, scales, dtype).contiguous()

    def forward(self, hidden_states, top_k_index, top_k_weights, lora: dict[str, Any] | None = None):
        if lora is None and getattr(self, "parametrizations", None):
            raise GptossHpcError(
                "MXFP4 experts take their LoRA factored (x@W + s(x@A)@B); PEFT's merged-weight path would drop it. "
                "Apply gptoss_hpc.modeling.fast.apply_speed_knobs (it factors the expert LoRA) or use "
                "model.experts_dtype=bfloat16"
            )
        from gptoss_hpc.modeling.fast.experts import moe_experts_core

        lora = lora or {}
        args = (
            hidden_states,
            top_k_index,
            top_k_weights,
            (self.gate_up_proj_blocks, self.gate_up_proj_scales),
            self.gate_up_proj_bias,
            (self.down_proj_blocks, self.down_proj_scales),
            self.down_proj_bias,
            float(self.alpha),
            float(self.limit),
            lora.get("gate_up_proj"),
            lora.get("down_proj"),
        )
        if not _compiles(hidden_states.device) or _COMPILED.get("mxfp4_disabled"):
            return moe_experts_core(*args)
        if "mxfp4_core" not in _COMPILED:
            _COMPILED["mxfp4_core"] = _compile(moe_experts_core)
        try:
            return _COMPILED["mxfp4_core"](*args)
        except torch.utils.checkpoint._StopRecomputationError:
            raise  # non-reentrant checkpointing stops its recompute this way: not a compile failure
        except Exception as exc:  # a torch.compile failure must not kill a training run: run it eagerly
            log.warning("compiled MXFP4 experts failed (%s: %s); running them eagerly", type(exc).__name__, exc)
            _COMPILED["mxfp4_disabled"] = True
            return moe_experts_core(*args)


def release_placeholders(model) -> int:
    """``placeholders_as_attributes`` on every MXFP4 experts module of ``model``; returns how many."""
    modules = [m for m in model.modules() if isinstance(m, Mxfp4Experts)]
    for m in modules:
        m.placeholders_as_attributes()
    return len(modules)
