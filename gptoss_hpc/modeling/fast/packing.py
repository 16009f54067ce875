"""Knob 3: padding-free packing with per-sequence positions (gptoss_hpc.modeling.fast)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


from gptoss_hpc.modeling.fast.anatomy import IGNORE_INDEX, unwrap

log = logging.getLogger(__name__)


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
    config = base.config
    if getattr(config, "_attn_implementation", None) == "flex_attention" and position_ids.is_cuda:
        # Not transformers' find_packed_sequence_indices: its "one sequence only?" check reads the device (a host
        # sync per micro-batch). A one-document mask is the causal mask, so the check buys nothing here.
        return flex_document_masks(config, document_ids(position_ids))
    docs = masking_utils.find_packed_sequence_indices(position_ids)
    if docs is None:
        return None
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


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, T] document index of each token of a packed row: a new document wherever the position does not
    follow the previous one (transformers' find_packed_sequence_indices without its data-dependent early exit)."""
    import torch

    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


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


_MASK_BUILDER: list[Any] = []


def _block_mask_builder():
    """create_block_mask compiled once with dynamic shapes. Uncompiled it evaluates the mask over the full S x S
    grid (pytorch#134756: out of memory at 96k tokens); compiled with static shapes (its ``_compile=True``) it
    compiles again for the second length it sees. Compiled dynamic from the first call it makes one graph per
    mask kind (full, sliding) and then takes any length and document layout without compiling again (the same
    BlockMask as the uncompiled builder: tests/test_long_attention.py)."""
    if not _MASK_BUILDER:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        _MASK_BUILDER.append(torch.compile(create_block_mask, dynamic=True, fullgraph=True))
    return _MASK_BUILDER[0]


def flex_document_masks(config, docs) -> dict[str, Any]:
    """flex_attention BlockMasks for a packed row with document ids ``docs`` [batch, T], any T (a multiple of
    flex's 128-token block or not) without recompiling (see _block_mask_builder)."""
    batch, length = docs.shape
    build = _block_mask_builder()
    masks = {}
    for kind, window in (("full_attention", None), ("sliding_attention", getattr(config, "sliding_window", None))):
        if kind == "sliding_attention" and kind not in getattr(config, "layer_types", []):
            continue
        masks[kind] = build(_document_mask_mod(docs, window), batch, None, length, length, device=docs.device)
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
