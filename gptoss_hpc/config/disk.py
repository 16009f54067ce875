"""Disk pre-flight: what a launch will write under ``run_root``, against the free space there.

A full disk fails late and expensively, in the trainer's final checkpoint save after every step has run
(docs/BENCHMARKS.md, 2026-11-29, fa57b65), so the launch checks before it submits anything.
Per point, from the same architecture facts as the memory plan (gptoss_hpc.config.memory):
- train: ``train.save_total_limit + 1`` checkpoints (the trainer writes the newest before it deletes the oldest),
  each ~16 bytes per LoRA parameter (fp32 LoRA weights in the module state and in adapter_model.safetensors, two
  fp32 AdamW moments), plus the final adapter (4 bytes per parameter). Measured: 120b, experts LoRA r=8 (44.2 M
  parameters), one checkpoint + the adapter: 0.80 GiB, estimate 0.82.
- merge: the merged model: bf16 (20b ~39 GiB, 120b ~218 GiB) or, for ``merge.format=mxfp4``, the checkpoint's
  size (120b: 60.8 GiB measured, 60.8 estimated).
The base model and the Hugging Face cache are not counted (they live outside run_root, usually shared).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from gptoss_hpc.config import derive
from gptoss_hpc.config.memory import GIB, arch_for, lora_params, weights_gib
from gptoss_hpc.config.schema import RunConfig

CHECKPOINT_BYTES_PER_PARAM = 16
ADAPTER_BYTES_PER_PARAM = 4


def point_disk_gib(cfg: RunConfig) -> dict[str, float]:
    """GiB one point writes under run_root, per stage that writes much (empty when the architecture is unknown)."""
    arch = arch_for(cfg)
    if arch is None:
        return {}
    out: dict[str, float] = {}
    if "train" in cfg.stages:
        n = lora_params(cfg, arch)
        checkpoints = cfg.train.save_total_limit + 1
        out["train"] = (checkpoints * CHECKPOINT_BYTES_PER_PARAM + ADAPTER_BYTES_PER_PARAM) * n / GIB
    if "merge" in cfg.stages:
        mxfp4 = derive.mxfp4_resident(cfg) and cfg.merge.format == "mxfp4"
        out["merge"] = sum(weights_gib(cfg, arch, experts_dtype="mxfp4" if mxfp4 else "bfloat16"))
    return out


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above ``path`` (run_root may not exist yet)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_problems(cfgs: Iterable[RunConfig]) -> list[str]:
    """One problem per filesystem whose points (by their run_root) together need more than its free space."""
    groups: dict[int, list[RunConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(_existing(Path(cfg.run_root)).stat().st_dev, []).append(cfg)
    return [p for group in groups.values() for p in _filesystem_problems(group)]


def _filesystem_problems(cfgs: list[RunConfig]) -> list[str]:
    need: dict[str, float] = {}
    for cfg in cfgs:
        for stage, gib in point_disk_gib(cfg).items():
            need[stage] = need.get(stage, 0.0) + gib
    total = sum(need.values())
    root = _existing(Path(cfgs[0].run_root))
    free = shutil.disk_usage(root).free / GIB
    if total <= free:
        return []
    parts = ", ".join(f"{stage} {gib:,.1f} GiB" for stage, gib in need.items())
    fixes = ["free space there or set run_root to a larger filesystem"]
    if "merge" in need:
        fixes.append("leave merge out (stages=[train,eval,report] with eval.model=adapter)")
        if any(derive.mxfp4_resident(c) and c.merge.format == "bf16" for c in cfgs):
            fixes.append("merge.format=mxfp4")
    if len(cfgs) > 1:
        fixes.append("fewer sweep points")
    if "train" in need and any(c.train.save_total_limit > 1 for c in cfgs):
        fixes.append("train.save_total_limit=1")
    return [
        f"run_root={cfgs[0].run_root}: {len(cfgs)} point(s) would write ~{total:,.1f} GiB ({parts}) but {root} has "
        f"{free:,.1f} GiB free. Fix: " + "; ".join(fixes)
    ]
