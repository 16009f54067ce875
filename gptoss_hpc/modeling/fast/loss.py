"""Knob 2: fused, chunked lm_head + cross-entropy (gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


from gptoss_hpc.modeling.fast.anatomy import _COMPILED, IGNORE_INDEX, unwrap
from gptoss_hpc.modeling.fast.fallback import call_compiled, compile_backend

log = logging.getLogger(__name__)


def _linear_ce_forward(hidden, weight, labels, chunk_tokens: int, scale: float, need_dh: bool, need_dw: bool):
    """Loss sum * scale, and d(loss)/d(hidden), d(loss)/d(weight) computed chunk by chunk."""
    import torch

    n = hidden.shape[0]
    # a tensor, so the compiled CE does not recompile per scale; a fill kernel, not a host-to-device copy (a sync)
    scale_t = torch.full((), scale, dtype=torch.float32, device=hidden.device)
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
    """ce_chunk, compiled on CUDA (one fused pass instead of ~8 over a [chunk, 201088] fp32 tensor). Only a
    compile failure falls back to eager (gptoss_hpc.modeling.fast.fallback); an OOM or any other error propagates."""
    backend = compile_backend(device_type)
    if backend is None or _COMPILED.get("ce_disabled"):
        return ce_chunk
    key = "ce" if backend == "inductor" else f"ce:{backend}"
    if key not in _COMPILED:
        import torch

        # dynamic=None: the row count varies (prompt rows are dropped), so after the first new count dynamo
        # compiles one kernel for any count instead of one per count
        compiled = torch.compile(ce_chunk, dynamic=None, backend=backend)

        def safe(*args):
            return call_compiled(compiled, ce_chunk, args, what="cross-entropy", flag="ce_disabled", state=_COMPILED)

        _COMPILED[key] = safe
    return _COMPILED[key]


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
    predicted_rows: int | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``hidden @ weight.T`` against ``labels`` (unshifted, -100 = ignored).

    Equals transformers' ``ForCausalLMLoss(lm_head(hidden), labels, num_items_in_batch=...)``: the sum over
    predicted tokens divided by ``num_items_in_batch`` (else by the number of predicted tokens here).
    ``predicted_rows``: how many shifted labels are not ignored, counted on the host before the batch went to the
    device (``predicted_row_count``), so selecting those rows needs no device-to-host sync.
    """
    import torch

    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(h.device)
    if num_items_in_batch is None:
        denom = predicted_rows if predicted_rows is not None else int((y != IGNORE_INDEX).sum().item())
    else:
        denom = int(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    scale = 1.0 / max(denom, 1)
    h, y = _predicted_rows(h, y, predicted_rows)
    return _linear_ce().apply(h, weight, y, int(chunk_tokens), scale)


def _predicted_rows(h, y, n: int | None = None, multiple: int = 256):
    """Only the rows that predict a token go through lm_head (prompt and padding rows add 0 to the loss and
    its gradient): SFT batches mask the prompt, 30 % of the bench's tokens. The row count is padded up to a
    ``multiple`` (with ignored rows) so the compiled CE sees few shapes. With ``n`` (the count, known on the host)
    nothing waits for the device; without it the count is read back (one sync)."""
    import torch

    valid = y != IGNORE_INDEX
    if n is None:
        n = int(valid.sum())
    if n == y.numel():
        return h, y
    padded = max(multiple, -(-n // multiple) * multiple)
    if padded >= y.numel():
        return h, y
    # nonzero_static: a fixed-size result, so no sync; rows past n point at row 0 and get an ignored label
    idx = torch.nonzero_static(valid, size=padded, fill_value=0).squeeze(1)
    filler = torch.arange(padded, device=y.device) >= n
    labels = y.index_select(0, idx).masked_fill(filler, IGNORE_INDEX)
    return h.index_select(0, idx), labels


# The batch key under which the host-side count of predicted rows travels with a micro-batch (a plain int:
# accelerate and the trainer pass non-tensors through unchanged).
PREDICTED_ROWS = "gptoss_predicted_rows"


def predicted_row_count(labels) -> int:
    """How many labels of a [batch, T] (or [T]) CPU tensor predict a token after the causal shift: the rows
    ``chunked_causal_lm_loss`` sends through lm_head."""
    shifted = labels[..., 1:]
    return int((shifted != IGNORE_INDEX).sum())


class PredictedRowsCollator:
    """Wraps a collator: each batch also carries ``PREDICTED_ROWS``, counted here on the CPU (in the dataloader's
    workers), so the chunked loss selects its rows on the GPU without waiting for it. A module-level class: the
    dataloader's worker processes pickle it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if labels is not None and hasattr(labels, "device") and labels.device.type == "cpu":
            batch[PREDICTED_ROWS] = predicted_row_count(labels)
        return batch


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
    # output_router_logits=False whatever the config says (TRL sets it for the MoE aux loss): transformers would hook
    # every router and layer to collect logits this loss never reads (gptoss_hpc.modeling.fast.router_logits)
    out = decoder(input_ids=batch["input_ids"], use_cache=False, output_router_logits=False, **kwargs)
    return chunked_causal_lm_loss(
        out.last_hidden_state,
        base.get_output_embeddings().weight,
        batch["labels"],
        chunk_tokens=chunk_tokens,
        num_items_in_batch=num_items_in_batch,
        predicted_rows=batch.get(PREDICTED_ROWS),
    )
