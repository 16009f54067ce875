"""Training speed knobs for gpt-oss LoRA (docs/BENCHMARKS.md, "Training throughput (one H100)").

Each knob computes the same function as the stock transformers path (checked in tests/test_fast_path.py on
CPU and by ``python -m gptoss_hpc.bench train --check`` on the GPU):

- ``freeze_below_first_trainable_layer``: decoder layers below the lowest layer holding a trainable
  parameter run under ``torch.no_grad`` (no saved activations, no backward). With the ``experts`` preset
  (LoRA on layers 7/15/23) that is 7 of 24 layers.
- ``chunked_causal_lm_loss``: lm_head + cross-entropy over chunks of tokens, with the gradient computed
  chunk by chunk in the forward (Liger-style fused linear CE): no [tokens, 201088] logits tensor lives
  beyond one chunk, and nothing is recomputed.
- ``pack_sequences`` / ``PackingCollator``: padding-free packing into one row, ``position_ids`` reset per
  sequence, so transformers' mask code keeps attention within each sequence (flex_attention document mask).
- ``fused_experts_forward`` (``model.fused_experts: true``, with ``experts_implementation: grouped_mm``): the
  grouped_mm experts with the routing, bias, SwiGLU-with-limit and combine steps compiled by torch.compile around
  the two grouped GEMMs (fewer passes over [tokens*top_k, 5760] tensors, fewer saved activations), and the
  expert LoRA as x@W + s(x@A)@B (``factor_expert_lora``) instead of PEFT's per-forward W + s·A@B.
- ``compile_decoder_layers`` (``model.compile_layers``, without gradient checkpointing): regional torch.compile
  of every decoder layer.

``apply_speed_knobs(model, cfg)`` applies the configured ones to a (PEFT-wrapped) model and returns a handle
whose ``remove()`` restores the stock path; ``causal_lm_loss(model, batch, ...)`` is the loss to use in the
trainer's ``compute_loss`` when ``train.loss_chunk_tokens > 0``.
"""

from __future__ import annotations

from gptoss_hpc.modeling.fast.anatomy import (  # noqa: F401
    _COMPILED,
    decoder_layers,
    lowest_trainable_layer,
    unwrap,
)
from gptoss_hpc.modeling.fast.experts import (  # noqa: F401
    _compiled_core,
    _grouped_mm,
    expert_lora_factors,
    factor_expert_lora,
    fused_experts_forward,
    moe_experts_core,
    register_fused_experts,
)
from gptoss_hpc.modeling.fast.knobs import (  # noqa: F401
    SpeedKnobs,
    _on_cuda,
    apply_speed_knobs,
    compiles_layers,
    set_experts_implementation,
)
from gptoss_hpc.modeling.fast.loss import (  # noqa: F401
    _ce_chunk_fn,
    _linear_ce,
    _linear_ce_forward,
    _make_linear_ce_function,
    causal_lm_loss,
    ce_chunk,
    chunked_causal_lm_loss,
)
from gptoss_hpc.modeling.fast.packing import (  # noqa: F401
    PackingCollator,
    _document_mask_mod,
    _packed_masks_hook,
    flex_document_masks,
    isolate_packed_sequences,
    pack_greedy,
    pack_sequences,
    packed_sequence_masks,
)
from gptoss_hpc.modeling.fast.prefix import (  # noqa: F401
    _raise_recompile_limit,
    compile_decoder_layers,
    freeze_below_first_trainable_layer,
)
