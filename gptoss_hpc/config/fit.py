"""``train.fit_memory``: the shipped default trains at the fastest setting that fits the card.

train=default is the fast path (no recompute, 4 x 2048-token micro-batches, compiled layers): 55.8 GiB for 20b in
bf16, 85.1 GiB for 120b in MXFP4. Where the memory plan (gptoss_hpc.config.memory) says the train stage does not
fit ``cluster.gpu_memory_gib``, the launcher switches to the fastest setting that fits, with the same tokens per
optimizer step, and says so. It never overrides what the user chose: when the command line sets a key the fit
would change, or train.fit_memory=false (train=reference), validate refuses instead and names the fixes.

Speed of each change relative to the fast path, for the same tokens per optimizer step (one H200, bench train,
docs/BENCHMARKS.md; 120b MXFP4 4x2048 = 14,649 tok/s):
- gradient checkpointing: 0.61 (120b: 8,921 tok/s at 67.6 GiB);
- smaller micro-batches, 120b (128 experts, whose MXFP4 dequant is paid once per micro-batch): 2 x 2048, GA x4:
  0.65 (9,306 tok/s at 75.3 GiB against 14,290 at 4x2048 in the same call); 1 x 2048, GA x8: 0.41 (5,928);
- smaller micro-batches, 20b (32 experts): 2 x 2048: 0.89 (H100 bench, 28,085 against 31,657 tok/s); 1 x 2048: not
  measured, 0.40 assumed (120b's);
- MXFP4 experts instead of bf16 (20b): 0.77 (25,648 at 2x2048 against 33,474 bf16 at 4x2048, so an upper
  bound on the cost); exact, the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from gptoss_hpc.config.memory import (
    USABLE,
    Arch,
    Estimate,
    arch_for,
    gpu_memory_gib,
    later_stage_problems,
    train_estimate,
)
from gptoss_hpc.config.schema import RunConfig

log = logging.getLogger(__name__)

# Keys the fit may change: set on the command line, they are the user's choice and are never changed.
FIT_KEYS = (
    "model.experts_dtype",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.gradient_checkpointing",
    "train.gradient_checkpointing_offload",
)
RECOMPUTE_SPEED = 0.61
# recompute with the checkpointed layer inputs in pinned host memory, relative to recompute alone (not yet measured
# through the train stage: docs/BENCHMARKS.md, long rows)
OFFLOAD_SPEED = 0.85
MXFP4_SPEED = 0.77
# relative to 4 x max_length (the module docstring), by the model's expert count
_MICRO_BATCH_SPEED = {128: {4: 1.0, 2: 0.65, 1: 0.41}, 32: {4: 1.0, 2: 0.89, 1: 0.40}}


def _micro_speed(rows: int, start: int, experts: int) -> float:
    """Relative speed of ``rows`` per micro-batch against ``start`` (measured from 4; larger counts as 4)."""
    table = _MICRO_BATCH_SPEED[128 if experts > 32 else 32]
    return table.get(min(rows, 4), 0.4) / table.get(min(start, 4), 1.0)


def candidates(cfg: RunConfig, arch: Arch) -> list[tuple[float, str, RunConfig]]:
    """(relative speed, the overrides, the config) of every setting the fit may pick, fastest first."""
    t, m = cfg.train, cfg.model
    dtypes = [m.experts_dtype] + (["mxfp4"] if m.experts_dtype != "mxfp4" else [])
    out = []
    for dtype in dtypes:
        rows = t.per_device_train_batch_size
        while rows >= 1:
            accum = t.gradient_accumulation_steps * (t.per_device_train_batch_size // rows)
            settings = [
                (r, o)
                for r in sorted({t.gradient_checkpointing, True})
                for o in sorted({t.gradient_checkpointing_offload and r, r})
            ]
            for recompute, offload in settings:
                speed = _micro_speed(rows, t.per_device_train_batch_size, arch.experts)
                speed *= MXFP4_SPEED if dtype != m.experts_dtype else 1.0
                speed *= RECOMPUTE_SPEED if recompute and not t.gradient_checkpointing else 1.0
                speed *= OFFLOAD_SPEED if offload and not t.gradient_checkpointing_offload else 1.0
                changes = []
                if dtype != m.experts_dtype:
                    changes.append(f"model.experts_dtype={dtype}")
                if rows != t.per_device_train_batch_size:
                    changes += [
                        f"train.per_device_train_batch_size={rows}",
                        f"train.gradient_accumulation_steps={accum}",
                    ]
                if recompute != t.gradient_checkpointing:
                    changes.append(f"train.gradient_checkpointing={str(recompute).lower()}")
                if offload != t.gradient_checkpointing_offload:
                    changes.append(f"train.gradient_checkpointing_offload={str(offload).lower()}")
                new = replace(
                    cfg,
                    model=replace(m, experts_dtype=dtype),
                    train=replace(
                        t,
                        per_device_train_batch_size=rows,
                        gradient_accumulation_steps=accum,
                        gradient_checkpointing=recompute,
                        gradient_checkpointing_offload=offload,
                    ),
                )
                out.append((speed, " ".join(changes), new))
            if rows % 2:
                break
            rows //= 2
    return sorted(out, key=lambda c: -c[0])


def user_set(overrides: Iterable[str]) -> list[str]:
    """The FIT_KEYS a command line sets (``key=value``, ``+key=value``, ``++key=value``)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [k for k in FIT_KEYS if k in keys]


def fastest_fit(cfg: RunConfig, arch: Arch, capacity: float) -> tuple[float, str, RunConfig, Estimate] | None:
    """The first of ``candidates(cfg, arch)`` (fastest first, ``cfg`` itself included) whose train stage fits
    ``capacity`` GiB: (relative speed, the overrides, the config, its estimate), or None."""
    for speed, changes, new in candidates(cfg, arch):
        est = train_estimate(new, arch, capacity)
        if est.fits:
            return speed, changes, new, est
    return None


def fit_to_card(cfg: RunConfig, overrides: Iterable[str]) -> tuple[RunConfig, str | None]:
    """``cfg``, or the fastest candidate whose train stage fits the card, and the line that says what changed.
    Unchanged when train.fit_memory is off, the card or model is unknown, it fits already, the user set a key
    the fit would change, or nothing fits (validate then refuses with the fixes)."""
    if not cfg.train.fit_memory or cfg.cluster.accelerator != "gpu" or "train" not in cfg.stages:
        return cfg, None
    capacity, arch = gpu_memory_gib(cfg), arch_for(cfg)
    if capacity is None or arch is None:
        return cfg, None
    before = train_estimate(cfg, arch, capacity)
    found = None if before.fits or user_set(overrides) else fastest_fit(cfg, arch, capacity)
    if found is None:
        return cfg, None
    speed, changes, new, est = found
    return new, (
        f"train.fit_memory: the train stage needs ~{before.card:.1f} GiB per GPU as configured, more than "
        f"cluster.gpu_memory_gib={capacity:g}; training with {changes} instead (~{est.card:.1f} GiB, "
        f"~{speed:.0%} of the speed, same tokens per optimizer step). Set train.fit_memory=false to be "
        "refused instead, or set these keys yourself"
    )


def trains_on_card(cfg: RunConfig, overrides: Iterable[str]) -> bool:
    """Whether the launch can train ``cfg`` on its card: as it is, or through fit_to_card's choice when that may
    change it (True where the card or the model is unknown, or there is no GPU)."""
    capacity, arch = gpu_memory_gib(cfg), arch_for(cfg)
    if capacity is None or arch is None or cfg.cluster.accelerator != "gpu":
        return True
    if cfg.train.fit_memory and not user_set(overrides):
        return fastest_fit(cfg, arch, capacity) is not None
    return bool(train_estimate(cfg, arch, capacity).fits)


def fixes_that_fit(cfg: RunConfig, arch: Arch, capacity: float, limit: int = 3) -> list[str]:
    """Up to ``limit`` settings of ``candidates`` whose train stage fits, fastest first, as overrides: the first is
    what train.fit_memory would pick. An unchunked loss is chunked first in each (the same numbers, no slower)."""
    prefix = ""
    if cfg.train.loss_chunk_tokens <= 0:
        cfg = replace(cfg, train=replace(cfg.train, loss_chunk_tokens=4096))
        prefix = "train.loss_chunk_tokens=4096"
    found: list[str] = []
    for _, changes, new in candidates(cfg, arch):
        fix = " ".join(p for p in (prefix, changes) if p)
        if fix and fix not in found and train_estimate(new, arch, capacity).fits:
            found.append(fix)
            if len(found) >= limit:
                break
    return found


def memory_problems(cfg: RunConfig) -> list[str]:
    """validate's check: each stage's estimated peak must fit the card (skipped when the size is unknown)."""
    if cfg.cluster.accelerator != "gpu":
        return []
    capacity = gpu_memory_gib(cfg)
    arch = arch_for(cfg)
    if capacity is None or arch is None:
        return []
    later = later_stage_problems(cfg, arch, capacity)
    if "train" not in cfg.stages:
        return later
    est = train_estimate(cfg, arch, capacity)
    if est.fits:
        return later
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.parts.items() if v >= 0.05)
    fixes = fixes_that_fit(cfg, arch, capacity)
    fix = "; ".join(f"({i}) {f}" for i, f in enumerate(fixes, 1)) or "none found: use a larger card"
    zero = (
        " ZeRO-2 shards only LoRA gradients and optimizer state, so more GPUs do not lower it; ZeRO-3 is not"
        " supported for expert LoRA (train.zero.stage)."
    )
    return [
        *later,
        f"train stage needs ~{est.card:.1f} GiB per GPU (allocated {est.allocated:.1f}: {parts}) but "
        f"cluster.gpu_memory_gib={capacity:g} leaves {capacity * USABLE:.1f}; cheapest fixes that fit (fastest "
        f"first): {fix}.{zero} See `python -m gptoss_hpc.plan <same overrides>`",
    ]
