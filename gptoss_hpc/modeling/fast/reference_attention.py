"""An exact gpt-oss attention for long packed rows, written from the definition, to check the fast path against.

Per query chunk it takes only the keys that chunk may see (same document, causal, within the sliding window of a
sliding layer), adds the layer's sink logit to the softmax denominator, and computes in fp32. Each chunk runs
under activation checkpointing, so a 32k-token row needs one chunk's scores at a time, forward and backward,
never the S x S matrix. Documents come from ``position_ids`` (a new document wherever the position does not
follow the previous one), not from the attention masks the model was given: the masks are what it checks.

``reference_attention(model)`` makes a transformers gpt-oss model use it (and builds no masks for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

NAME = "gptoss_chunked_reference"
QUERY_CHUNK = 256
# what a mask bug would look like, for the check's controls: documents merged into one, sliding windows ignored
_CONTROL = {"merge_documents": False, "ignore_window": False}


def _chunk(q, k, v, sinks, docs, q0: int, k0: int, window: int | None, scaling: float):
    """fp32 attention of queries [q0, q0 + len) over keys [k0, k0 + len): q [b, h, n, d], k/v [b, h, m, d]."""
    import torch

    n, m = q.shape[-2], k.shape[-2]
    qi = torch.arange(q0, q0 + n, device=q.device)[:, None]
    ki = torch.arange(k0, k0 + m, device=q.device)[None, :]
    allowed = (ki <= qi)[None] & (docs[:, q0 : q0 + n, None] == docs[:, None, k0 : k0 + m])  # [b, n, m]
    if window is not None:
        allowed = allowed & (qi - ki < window)[None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(scores.shape[0], -1, n, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, v)


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    scaling: float,
    window: int | None,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """[b, heads, T, d] queries, [b, kv_heads, T, d] keys/values -> [b, T, heads, d] in fp32 (GQA by repeat)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from gptoss_hpc.modeling.fast.packing import document_ids

    groups = query.shape[1] // key.shape[1]
    q, s = query.float(), sinks.float()
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    docs = document_ids(position_ids.to(query.device).expand(query.shape[0], -1))
    starts = torch.cat([torch.zeros_like(docs[:, :1]), (docs[:, 1:] != docs[:, :-1]).long()], dim=1)
    # first key any query of a chunk may see: its document's start (or the window's), over the whole batch
    doc_start = torch.cummax(starts * torch.arange(docs.shape[1], device=docs.device), dim=1).values
    length = q.shape[-2]
    outs = []
    for q0 in range(0, length, chunk):
        q1 = min(q0 + chunk, length)
        k0 = int(doc_start[:, q0].min())
        if window is not None:
            k0 = max(k0, q0 - window + 1)
        outs.append(
            checkpoint(
                _chunk, q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], s, docs, q0, k0, window, scaling,
                use_reentrant=False,
            )
        )  # fmt: skip
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def reference_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' attention-interface signature; the masks it is given are ignored (see the module doc)."""
    import torch

    if dropout:
        raise ValueError("the reference attention has no dropout: set lora/attention dropout to 0 for the check")
    if position_ids is None or _CONTROL["merge_documents"]:
        position_ids = torch.arange(query.shape[-2], device=query.device)[None]
    if _CONTROL["ignore_window"]:
        sliding_window = None
    sinks = s_aux if s_aux is not None else torch.full((query.shape[1],), float("-inf"), device=query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = chunked_attention(query, key, value, sinks, position_ids, scaling=scale, window=sliding_window)
    return out.to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, reference_attention_forward)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # it reads position_ids, not masks


@contextlib.contextmanager
def reference_attention(
    model: nn.Module, *, merge_documents: bool = False, ignore_window: bool = False
) -> Iterator[nn.Module]:
    """Within the block every attention layer of ``model`` runs the chunked fp32 reference, eagerly (compiled
    layers are not used). ``merge_documents`` / ``ignore_window``: the controls, a deliberately wrong reference."""
    import torch

    from gptoss_hpc.modeling.fast.anatomy import unwrap

    _register()
    base = unwrap(model)
    before = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    _CONTROL.update(merge_documents=merge_documents, ignore_window=ignore_window)
    try:
        with torch.compiler.set_stance("force_eager"):
            yield model
    finally:
        _CONTROL.update(merge_documents=False, ignore_window=False)
        base.set_attn_implementation(before)
