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
  the two grouped GEMMs (fewer passes over [tokens*top_k, 5760] tensors, fewer saved activations).

``apply_speed_knobs(model, cfg)`` applies the configured ones to a (PEFT-wrapped) model and returns a handle
whose ``remove()`` restores the stock path; ``causal_lm_loss(model, batch, ...)`` is the loss to use in the
trainer's ``compute_loss`` when ``train.loss_chunk_tokens > 0``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gptoss_hpc.config.schema import RunConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FUSED_EXPERTS = "fused_grouped_mm"


# --------------------------------------------------------------------------------------------------------------
# Model anatomy
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Knob 1: no autograd below the first trainable layer
# --------------------------------------------------------------------------------------------------------------
_NO_GRAD_CLASSES: dict[type, type] = {}


def _no_grad_class(cls: type) -> type:
    """A subclass of a decoder-layer class whose forward runs under torch.no_grad. One class for all such
    layers (not a per-layer wrapper), so a compiled layer's code is shared by all of them."""
    if cls not in _NO_GRAD_CLASSES:
        import torch

        def forward(self, *args, **kwargs):
            with torch.no_grad():
                return super(sub, self).forward(*args, **kwargs)

        sub = type(f"NoGrad{cls.__name__}", (cls,), {"forward": forward, "_gptoss_no_grad_base": cls})
        _NO_GRAD_CLASSES[cls] = sub
    return _NO_GRAD_CLASSES[cls]


def freeze_below_first_trainable_layer(model: nn.Module) -> list[nn.Module]:
    """Run decoder layers [0, first trainable) without autograd. Returns the changed layers.

    The hidden state entering the first trainable layer then has no grad history: its backward stops there,
    which is exact, since nothing below it trains (the input embeddings must be frozen; if they train, the
    first trainable "layer" is 0 and nothing changes). Independent of gradient checkpointing.
    """
    first = lowest_trainable_layer(model)
    changed = []
    for layer in list(decoder_layers(model))[:first]:
        if hasattr(type(layer), "_gptoss_no_grad_base"):
            continue
        layer.__class__ = _no_grad_class(type(layer))
        changed.append(layer)
    log.info("layers 0..%d run without autograd (first trainable layer: %d)", first - 1, first)
    return changed


def _restore_class(layer: nn.Module) -> None:
    base = getattr(type(layer), "_gptoss_no_grad_base", None)
    if base is not None:
        layer.__class__ = base


def compile_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Regional torch.compile: every decoder layer whose modules PEFT's ParamWrapper does not wrap (its
    parametrization is registered inside the forward, which dynamo cannot trace); those keep the eager layer
    with the compiled experts core. Identical layers share the compiled code."""

    import torch

    _raise_recompile_limit()
    # layer_idx / sliding_window are ints on the modules: do not compile one graph per layer for them
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    compiled = []
    for layer in decoder_layers(model):
        if any(type(m).__name__ == "ParamWrapper" for m in layer.modules()):
            continue
        layer.compile(dynamic=False)
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


# --------------------------------------------------------------------------------------------------------------
# Knob 2: fused, chunked lm_head + cross-entropy
# --------------------------------------------------------------------------------------------------------------
def _linear_ce_forward(hidden, weight, labels, chunk_tokens: int, scale: float, need_dh: bool, need_dw: bool):
    """Loss sum * scale, and d(loss)/d(hidden), d(loss)/d(weight) computed chunk by chunk."""
    import torch

    n = hidden.shape[0]
    scale_t = torch.tensor(scale, dtype=torch.float32, device=hidden.device)  # a tensor: no recompiles
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    for start in range(0, n, chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        y = labels[start : start + chunk_tokens]
        # Same numerics as the stock path: logits in the model dtype, upcast to fp32 for the softmax.
        logits = h @ weight.t()
        part, grad = _ce_chunk_fn(logits.device.type)(logits, y, scale_t)
        loss += part
        if need_dh:
            dh[start : start + chunk_tokens] = grad @ weight
        if need_dw:
            dw.add_((grad.t() @ h).float())
        del logits
    return loss * scale, dh, dw


def ce_chunk(logits, labels, scale):
    """Summed CE of one chunk of logits and its gradient (softmax - onehot) * scale, in logits' dtype."""
    import torch

    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = lf.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
    onehot = torch.arange(lf.shape[-1], device=lf.device)[None, :] == safe[:, None]
    grad = (torch.exp(lf - lse[:, None]) - onehot.to(lf.dtype)) * (valid.to(lf.dtype) * scale)[:, None]
    return loss, grad.to(logits.dtype)


def _ce_chunk_fn(device_type: str):
    """ce_chunk, compiled on CUDA (one fused pass instead of ~8 over a [chunk, 201088] fp32 tensor)."""
    if device_type != "cuda" or _COMPILED.get("ce_disabled"):
        return ce_chunk
    if "ce" not in _COMPILED:
        import torch

        compiled = torch.compile(ce_chunk, dynamic=False)

        def safe(*args):
            try:
                return compiled(*args)
            except Exception as exc:
                log.warning("compiled CE failed (%s: %s); running it eagerly", type(exc).__name__, exc)
                _COMPILED["ce_disabled"] = True
                return ce_chunk(*args)

        _COMPILED["ce"] = safe
    return _COMPILED["ce"]


def _make_linear_ce_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk_tokens, scale):
            loss, dh, dw = _linear_ce_forward(
                hidden, weight, labels, chunk_tokens, scale, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            )
            ctx.save_for_backward(dh if dh is not None else torch.empty(0), dw if dw is not None else torch.empty(0))
            ctx.has = (dh is not None, dw is not None)
            ctx.weight_dtype = weight.dtype
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            dh, dw = ctx.saved_tensors
            gh = dh * grad_loss.to(dh.dtype) if ctx.has[0] else None
            gw = (dw * grad_loss).to(ctx.weight_dtype) if ctx.has[1] else None
            return gh, gw, None, None, None

    return LinearCrossEntropy


@functools.cache
def _linear_ce():
    return _make_linear_ce_function()


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 4096,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``hidden @ weight.T`` against ``labels`` (unshifted, -100 = ignored).

    Equals transformers' ``ForCausalLMLoss(lm_head(hidden), labels, num_items_in_batch=...)``: the sum over
    predicted tokens divided by ``num_items_in_batch`` (else by the number of predicted tokens here).
    """
    import torch

    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(h.device)
    if num_items_in_batch is None:
        denom = int((y != IGNORE_INDEX).sum().item())
    else:
        denom = int(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    scale = 1.0 / max(denom, 1)
    return _linear_ce().apply(h, weight, y, int(chunk_tokens), scale)


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    chunk_tokens: int = 4096,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward through the decoder only, then the chunked lm_head + CE (no full logits).

    ``batch`` holds input_ids, labels and optionally position_ids / attention_mask. Usable from a trainer's
    ``compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)`` override.
    """
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    out = decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    return chunked_causal_lm_loss(
        out.last_hidden_state,
        base.get_output_embeddings().weight,
        batch["labels"],
        chunk_tokens=chunk_tokens,
        num_items_in_batch=num_items_in_batch,
    )


# --------------------------------------------------------------------------------------------------------------
# Knob 3: padding-free packing with per-sequence positions
# --------------------------------------------------------------------------------------------------------------
def pack_sequences(
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None = None,
    *,
    row_tokens: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Concatenate sequences into one row [1, T]; position_ids restart at 0 for each sequence.

    The first label of each sequence is set to -100, so no token predicts across a sequence boundary.
    A padded tail (to ``row_tokens`` or a multiple of ``pad_to_multiple_of``) is its own "sequence" with
    positions 0.. and labels -100. transformers (attention_mask=None) reads the sequence boundaries from
    the position_ids and masks attention within each sequence.
    """
    import torch

    ids: list[int] = []
    labs: list[int] = []
    pos: list[int] = []
    for i, seq in enumerate(sequences):
        lab = list(labels[i]) if labels is not None else list(seq)
        if len(lab) != len(seq):
            raise ValueError(f"sequence {i}: {len(seq)} tokens but {len(lab)} labels")
        if not seq:
            continue
        ids.extend(int(t) for t in seq)
        labs.extend([IGNORE_INDEX, *(int(t) for t in lab[1:])])
        pos.extend(range(len(seq)))
    n = len(ids)
    target = row_tokens if row_tokens is not None else n
    target = math.ceil(max(target, 1) / pad_to_multiple_of) * pad_to_multiple_of
    if n > target:
        raise ValueError(f"{n} tokens do not fit a row of {target}")
    pad = target - n
    ids.extend([pad_token_id] * pad)
    labs.extend([IGNORE_INDEX] * pad)
    pos.extend(range(pad))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labs], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "num_tokens": n,
    }


def packed_sequence_masks(model: nn.Module, position_ids: torch.Tensor, dtype=None) -> dict[str, Any] | None:
    """The attention masks of a packed row (sequence boundaries read from position_ids), one per layer type.

    transformers' gpt-oss (5.17 .. 5.24) builds its masks without position_ids, so a padding-free packed row
    attends across sequences unless the masks come prepared like this (the model takes a dict as
    attention_mask). None when the row holds a single sequence.
    """
    import inspect

    import torch
    from transformers import masking_utils

    base = unwrap(model)
    docs = masking_utils.find_packed_sequence_indices(position_ids)
    if docs is None:
        return None
    config = base.config
    if getattr(config, "_attn_implementation", None) == "flex_attention" and position_ids.is_cuda:
        return flex_document_masks(config, docs)
    batch, length = position_ids.shape
    dtype = dtype or next(base.parameters()).dtype
    embeds = torch.empty((batch, length, 0), dtype=dtype, device=position_ids.device)
    params = inspect.signature(masking_utils.create_causal_mask).parameters
    kwargs: dict[str, Any] = {"config": config, "inputs_embeds": embeds, "attention_mask": None}
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(length, device=position_ids.device)
    kwargs["position_ids"] = position_ids
    masks = {"full_attention": masking_utils.create_causal_mask(**kwargs)}
    if "sliding_attention" in getattr(config, "layer_types", []):
        masks["sliding_attention"] = masking_utils.create_sliding_window_causal_mask(**kwargs)
    return masks


def _document_mask_mod(docs, window: int | None):
    """Causal (optionally sliding-window) attention within each document of a packed row. A plain closure
    over the document-id tensor and an int: compiled layers see two mask structures (full, sliding), where
    transformers' nested mask closures made torch.compile recompile the layers on every micro-batch."""
    if window is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (docs[b, q_idx] == docs[b, kv_idx])

    return mask_mod


def flex_document_masks(config, docs) -> dict[str, Any]:
    """flex_attention BlockMasks for a packed row with document ids ``docs`` [batch, T]."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = docs.shape
    masks = {}
    for kind, window in (("full_attention", None), ("sliding_attention", getattr(config, "sliding_window", None))):
        if kind == "sliding_attention" and kind not in getattr(config, "layer_types", []):
            continue
        masks[kind] = create_block_mask(
            _document_mask_mod(docs, window), batch, None, length, length, device=docs.device, _compile=True
        )
    return masks


def _packed_masks_hook(module, args, kwargs):
    position_ids = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or position_ids is None or position_ids.dim() != 2:
        return None
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    masks = packed_sequence_masks(module, position_ids)
    if masks is None:
        return None
    kwargs["attention_mask"] = masks
    return args, kwargs


def isolate_packed_sequences(model: nn.Module):
    """Make the decoder keep attention within each sequence of a padding-free packed row (see
    packed_sequence_masks); returns the hook handle. Idempotent."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if getattr(decoder, "_gptoss_packed_hook", None) is None:
        decoder._gptoss_packed_hook = decoder.register_forward_pre_hook(_packed_masks_hook, with_kwargs=True)
    return decoder._gptoss_packed_hook


@dataclass
class PackingCollator:
    """Collator: features with ``input_ids`` (and optional ``labels``) -> one packed row (see pack_sequences)."""

    pad_token_id: int = 0
    row_tokens: int | None = None
    pad_to_multiple_of: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, features: Iterable[dict[str, Any]]) -> dict[str, Any]:
        feats = list(features)
        seqs = [f["input_ids"] for f in feats]
        labels = [f.get("labels", f["input_ids"]) for f in feats]
        out = pack_sequences(
            seqs,
            labels,
            row_tokens=self.row_tokens,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        out.pop("num_tokens")
        return out


def pack_greedy(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bins of sequence indices, each bin's total <= row_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > row_tokens:
            raise ValueError(f"sequence {i} ({lengths[i]} tokens) is longer than a row ({row_tokens})")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(row_tokens - lengths[i])
    return bins


# --------------------------------------------------------------------------------------------------------------
# Knob 4: compiled elementwise around transformers' grouped_mm experts
# --------------------------------------------------------------------------------------------------------------
def _grouped_mm(x, w, offs):
    """torch's grouped_mm for bf16 on CUDA (also under torch.compile); transformers' dispatcher otherwise (its
    fallback op covers fp32 on CUDA, used by the bench's fp32 check, and CPU). transformers 5.17's dispatcher
    takes the slow per-expert fallback inside torch.compile, so it is not used for bf16 on CUDA."""
    import torch

    if x.is_cuda and w.dtype == torch.bfloat16:
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x.to(w.dtype), w, offs=offs)
    try:
        from transformers.integrations.moe import _grouped_mm as dispatch
    except ImportError:
        dispatch = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return dispatch(x, w, offs=offs)


def moe_experts_core(hidden, top_k_index, top_k_weights, w_gu, b_gu, w_d, b_d, alpha: float, limit: float):
    """gpt-oss experts (interleaved gate/up, clamped SwiGLU, biases) over grouped GEMMs.

    Same arithmetic as transformers' ``grouped_mm_experts_forward`` + ``GptOssExperts._apply_gate``.
    """
    import torch

    num_experts = w_gu.shape[0]
    num_tokens, hidden_dim = hidden.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden[perm // top_k]
    if hidden.device.type == "cuda":
        counts = torch.histc(expert_ids_g.int(), bins=num_experts, min=0, max=num_experts - 1)
    else:
        counts = torch.histc(expert_ids_g.float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = _grouped_mm(x.to(w_gu.dtype), w_gu, offs) + b_gu[expert_ids_g]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    y = _grouped_mm(act, w_d, offs) + b_d[expert_ids_g]
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    out = y[inv_perm].view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden.dtype)


_COMPILED: dict[str, Any] = {}


def _compiled_core():
    import torch

    if "core" not in _COMPILED:
        _COMPILED["core"] = torch.compile(moe_experts_core, dynamic=False)
    return _COMPILED["core"]


def fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers ExpertsInterface entry for ``experts_implementation="fused_grouped_mm"``.

    Weights are read here, outside the compiled region, so PEFT's parametrized (LoRA) expert weights reach
    the compiled core as plain tensors and their gradients flow through grouped_mm's autograd.
    """
    _COMPILED["calls"] = _COMPILED.get("calls", 0) + 1
    args = (
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj,
        self.gate_up_proj_bias,
        self.down_proj,
        self.down_proj_bias,
        float(self.alpha),
        float(self.limit),
    )
    if hidden_states.device.type != "cuda" or _COMPILED.get("disabled"):
        return moe_experts_core(*args)
    try:
        return _compiled_core()(*args)
    except Exception as exc:  # a torch.compile failure must not kill a training run: run it eagerly
        log.warning("compiled experts failed (%s: %s); running them eagerly", type(exc).__name__, exc)
        _COMPILED["disabled"] = True
        return moe_experts_core(*args)


def register_fused_experts() -> None:
    from transformers.integrations import moe

    moe.ALL_EXPERTS_FUNCTIONS._global_mapping[FUSED_EXPERTS] = fused_experts_forward


# --------------------------------------------------------------------------------------------------------------
# Entry point for the train stage
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SpeedKnobs:
    """What apply_speed_knobs changed; ``remove()`` restores the stock path (used by the bench's check)."""

    model: Any
    frozen_prefix: list[Any] = field(default_factory=list)
    compiled_layers: list[Any] = field(default_factory=list)
    experts_before: str | None = None
    experts_after: str | None = None
    loss_chunk_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "no_grad_layers": len(self.frozen_prefix),
            "compiled_layers": len(self.compiled_layers),
            "experts_implementation": self.experts_after,
            "loss_chunk_tokens": self.loss_chunk_tokens,
            "fused_experts_calls_so_far": _COMPILED.get("calls", 0),
        }

    def remove(self) -> None:
        for layer in self.frozen_prefix:
            _restore_class(layer)
        self.frozen_prefix = []
        for layer in self.compiled_layers:
            layer._compiled_call_impl = None
        self.compiled_layers = []
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


def apply_speed_knobs(model: nn.Module, cfg: RunConfig) -> SpeedKnobs:
    """Apply the knobs that ``cfg`` turns on, to a model that already has its LoRA adapters and gradient
    checkpointing set up. ``model.fused_experts`` swaps in the compiled experts (the model is built with
    ``experts_implementation=grouped_mm``); ``train.no_grad_below_first_lora`` runs the frozen prefix
    without autograd; ``model.compile_layers`` compiles the decoder layers (CUDA);
    ``train.loss_chunk_tokens`` is recorded here and applied by ``causal_lm_loss`` in the loss."""
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
    if getattr(t, "no_grad_below_first_lora", False):
        knobs.frozen_prefix = freeze_below_first_trainable_layer(model)
    if getattr(m, "compile_layers", False) and _on_cuda(model):
        knobs.compiled_layers = compile_decoder_layers(model)
    if knobs.experts_after or knobs.compiled_layers:
        _raise_recompile_limit()
    log.info("speed knobs: %s", knobs.summary())
    return knobs
