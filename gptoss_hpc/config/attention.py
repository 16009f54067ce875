"""Can the configured attention path train rows of a given length exactly? (pure: no torch)

The launch calls ``attention_length_problems(cfg, arch, max_length)`` with the longest row it will train (tokens of
one document; a packed micro-batch may hold more tokens than that, since positions restart per document) and
refuses the run on any line it returns. What is exact at long range, and why the others are refused:

- flex_attention (the GPU presets) on CUDA: exact at 32k-128k with sinks, sliding windows and packed documents
  (``python -m gptoss_hpc.bench long_check``; the BlockMasks hold one entry per 128 x 128 block, no S x S);
- eager: exact, but it holds each layer's [heads, L, L] scores (and keeps them for backward): refused where one
  layer's scores pass ``EAGER_SCORE_GIB``;
- sdpa: no attention sinks (refused at any length by config validation);
- flex_attention on CPU: transformers refuses attention sinks there;
- a row longer than the model's ``max_position_embeddings`` (131,072 for gpt-oss): positions past the ones the
  rotary scaling (YaRN) was trained for.
"""

from __future__ import annotations

from gptoss_hpc.config.memory import GIB, Arch
from gptoss_hpc.config.schema import RunConfig

# one layer's fp32 [heads, L, L] attention scores, above which eager attention is refused (20b, 64 heads: 4,096
# tokens = 4 GiB passes, 8,192 = 16 GiB does not)
EAGER_SCORE_GIB = 8.0


def eager_score_gib(arch: Arch, length: int) -> float:
    """GiB of one layer's fp32 attention scores for one row of ``length`` tokens under eager attention."""
    return arch.heads * length * length * 4 / GIB


def eager_max_length(arch: Arch) -> int:
    """The longest row eager attention is allowed to train (a multiple of 128)."""
    n = int((EAGER_SCORE_GIB * GIB / (arch.heads * 4)) ** 0.5)
    return n - n % 128


def attention_length_problems(cfg: RunConfig, arch: Arch, max_length: int) -> list[str]:
    """Every reason the configured attention cannot train rows of ``max_length`` tokens exactly, each naming the
    key and the fix; empty when it can."""
    attn, problems = cfg.model.attn_implementation, []
    if max_length > arch.max_position_embeddings:
        problems.append(
            f"rows of {max_length:,} tokens are longer than the model's max_position_embeddings "
            f"({arch.max_position_embeddings:,}): positions past it are not ones the model was trained with; set "
            f"train.max_length<={arch.max_position_embeddings} with data.max_length_policy=truncate or drop"
        )
    if attn == "flex_attention" and cfg.cluster.accelerator == "cpu":
        problems.append(
            "model.attn_implementation=flex_attention cannot run on cluster.accelerator=cpu: transformers refuses "
            "attention sinks with flex_attention on CPU; use model.attn_implementation=eager on CPU"
        )
    if attn == "eager" and eager_score_gib(arch, max_length) > EAGER_SCORE_GIB:
        problems.append(
            f"model.attn_implementation=eager holds [heads, L, L] scores per layer: "
            f"{eager_score_gib(arch, max_length):,.1f} GiB at {max_length:,} tokens (limit {EAGER_SCORE_GIB:g}); "
            f"use model.attn_implementation=flex_attention (exact at long range, on CUDA) or "
            f"train.max_length<={eager_max_length(arch)}"
        )
    return problems
