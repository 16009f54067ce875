"""The merge stage for a base whose experts train MXFP4-resident (model.experts_dtype=mxfp4): no model is built.

``gptoss_hpc.modeling.mxfp4_merge`` reads the checkpoint tensor by tensor, dequantizes and adds the adapter's delta
on this process's GPU when there is one (one expert stack at a time), and writes bf16 shards (or, with
``merge.format=mxfp4``, the adapted experts re-quantized into blocks/scales); ``gptoss_hpc.modeling.mxfp4_merge_check``
then compares every adapted tensor of the written folder with PEFT's own merge. Peak host RSS and peak GPU memory
are printed and land in the check record and in ``status/merge.json`` (``peak_host_rss_gib``, ``peak_gpu_gib``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from gptoss_hpc.config import RunConfig
from gptoss_hpc.paths import PointPaths

log = logging.getLogger(__name__)


def merge_streaming(cfg: RunConfig, paths: PointPaths, out: Path) -> dict[str, Any]:
    """Merge paths.adapter into the MXFP4 base, shard by shard, into ``out``; returns the check record (with the
    merge's own figures under "merge")."""
    import torch

    from gptoss_hpc.modeling.model import _device, mxfp4_folder
    from gptoss_hpc.modeling.mxfp4_merge import merge_mxfp4_adapter
    from gptoss_hpc.modeling.mxfp4_merge_check import check_streaming_merge

    base = mxfp4_folder(cfg)
    device = _device()
    started = time.perf_counter()
    stats = merge_mxfp4_adapter(base, paths.adapter, out, cfg.model.dtype, device=device, out_format=cfg.merge.format)
    stats["wall_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    check = check_streaming_merge(base, paths.adapter, out, device=device, out_format=cfg.merge.format)
    check["check_wall_s"] = round(time.perf_counter() - started, 1)
    if device.startswith("cuda"):
        stats["peak_gpu_gib_with_check"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    check["merge"] = stats
    summary = (
        f"streaming merge ({cfg.merge.format}, on {device}): {stats['shards']} shards, {stats['merged_gib']} GiB, "
        f"{stats['merged_tensors']} tensors merged in {stats['wall_s']} s; peak host RSS "
        f"{stats['peak_host_rss_gib']} GiB, peak GPU {stats.get('peak_gpu_gib_with_check', 'n/a')} GiB; check "
        f"{'passed' if check['passed'] else 'FAILED'} on {check['adapted_parameters']} tensors"
    )
    if "survival_mean" in check:
        summary += f"; adapter's weight change kept by MXFP4: {check['survival_mean']:.1%}"
    print(summary, flush=True)
    log.info("%s", summary)
    return check
