"""Useful training FLOPs of gpt-oss LoRA, and MFU (pure arithmetic, no torch).

Counted per trained token, as in docs/BENCHMARKS.md: the matmuls of the active parameters forward and their
input gradient (2 + 2 FLOPs per active parameter: the base is frozen, so no weight gradient; LoRA's own FLOPs are
negligible), plus attention: per layer ``4 x heads x head_dim x context`` forward (QK^T and PV), x3 for forward +
backward. A token at position p of its document has context p + 1 in a full-attention layer and at most
``sliding_window`` in a sliding one. Recompute is not counted (it is not useful work).

MFU divides by the card's measured dense bf16 matmul rate, not the datasheet's: ``PEAK_TFLOPS`` (the H100 and
H200 share the GH100 compute die; FACTS.md measured 798 TFLOP/s on the H100).
"""

from __future__ import annotations

from collections.abc import Iterable

from gptoss_hpc.config.memory import Arch

PEAK_TFLOPS = {"h100": 798.0, "h200": 798.0}
DEFAULT_PEAK_TFLOPS = 798.0


def active_matmul_params(arch: Arch) -> int:
    """Parameters a token multiplies through: attention projections, router, top-k experts, lm_head."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_layer = arch.hidden * (2 * q + 2 * kv) + arch.hidden * arch.experts
    per_layer += arch.top_k * 3 * arch.hidden * arch.intermediate
    return arch.layers * per_layer + arch.vocab * arch.hidden


def _context_sum(length: int, window: int | None) -> int:
    """Sum over the positions of one document of the keys each query attends to (causal, optional window)."""
    full = length * (length + 1) // 2
    if window is None or length <= window:
        return full
    # positions >= window see exactly `window` keys
    return window * (window + 1) // 2 + (length - window) * window


def attention_flops(arch: Arch, doc_lengths: Iterable[int]) -> float:
    """Forward + backward attention FLOPs of a packed row whose documents have these lengths."""
    width = arch.heads * arch.head_dim
    sliding = arch.layers - arch.full_attention_layers
    total = 0
    for n in doc_lengths:
        total += arch.full_attention_layers * _context_sum(n, None)
        total += sliding * _context_sum(n, arch.sliding_window)
    return 3.0 * 4.0 * width * total


def train_flops(arch: Arch, doc_lengths: Iterable[int]) -> float:
    """Useful FLOPs of one training pass over documents of these lengths (matmuls + attention)."""
    lengths = list(doc_lengths)
    return 4.0 * active_matmul_params(arch) * sum(lengths) + attention_flops(arch, lengths)


def peak_tflops(device_name: str | None) -> float:
    """The dense bf16 rate MFU divides by, from a device name such as ``NVIDIA H100 80GB HBM3``."""
    name = (device_name or "").lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), DEFAULT_PEAK_TFLOPS)


def mfu(arch: Arch, doc_lengths: Iterable[int], seconds: float, device_name: str | None = None) -> float:
    """Useful model FLOPs utilisation of a pass over ``doc_lengths`` that took ``seconds``."""
    return train_flops(arch, doc_lengths) / seconds / (peak_tflops(device_name) * 1e12)
