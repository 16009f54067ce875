"""The merge stage for a base whose experts train MXFP4-resident (model.experts_dtype=mxfp4): no model is built.

``gptoss_hpc.modeling.mxfp4.merge`` reads the checkpoint tensor by tensor, dequantizes and adds the adapter's delta
on this process's GPU when there is one (one expert stack at a time), and writes bf16 shards (or, with
``merge.format=mxfp4``, the adapted experts re-quantized into blocks/scales); ``gptoss_hpc.modeling.mxfp4.merge_check``
then compares every adapted tensor of the written folder with PEFT's own merge. Peak host RSS and peak GPU memory
are printed and land in the check record and in ``status/merge.json`` (``peak_host_rss_gib``, ``peak_gpu_gib``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
    from gptoss_hpc.modeling.mxfp4.merge import merge_mxfp4_adapter
    from gptoss_hpc.modeling.mxfp4.merge_check import check_streaming_merge

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


def logit_survival(cfg: RunConfig, paths: PointPaths, merged: Path, samples: Sequence[Sequence[int]]) -> dict:
    """merge.format=mxfp4: how much of the adapter's effect on the logits the re-quantized model keeps, on the
    probe samples. One model at a time on the device (the MXFP4 base + adapter unmerged, then the merged one):
    ``logit_survival`` = max(0, 1 - mean|merged - adapter| / mean|adapter - base|) (1: the adapter's logits;
    0: no closer to them than the base), with the argmax agreement of merged and adapter."""
    from gptoss_hpc.modeling.merge_check import probe_logits
    from gptoss_hpc.modeling.model import _device, load_adapter_model, torch_dtype
    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model
    from gptoss_hpc.stages.common import free_device_memory

    model = load_adapter_model(cfg, paths, paths.adapter)
    adapter = probe_logits(model, samples)
    with model.disable_adapter():
        base = probe_logits(model, samples)
    del model
    free_device_memory()
    model = load_mxfp4_model(
        merged, _device(), torch_dtype(cfg.model.dtype), cfg.eval.attn_implementation, cfg.model.experts_implementation
    )
    after = probe_logits(model, samples)
    del model
    free_device_memory()
    n = sum(a.numel() for a in adapter)
    effect = sum(float((a - b).abs().sum()) for a, b in zip(adapter, base, strict=True)) / n
    lost = sum(float((a - m).abs().sum()) for a, m in zip(adapter, after, strict=True)) / n
    tokens = sum(a.shape[0] for a in adapter)
    agree = sum(int((a.argmax(-1) == m.argmax(-1)).sum()) for a, m in zip(adapter, after, strict=True)) / tokens
    return {
        "logit_effect_mean_abs": effect,
        "logit_diff_mean_abs": lost,
        "logit_survival": max(0.0, 1.0 - lost / effect) if effect > 0 else 0.0,
        "logit_argmax_agreement": agree,
        "logit_probe_tokens": tokens,
    }
