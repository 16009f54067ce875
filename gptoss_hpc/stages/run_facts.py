"""What a finished training cost, for train_metrics.json: steady tok/s and MFU, peak GPU memory, the GPUs used and the
useful work counted per micro-batch (gptoss_hpc.modeling.useful_work). `status` and the report read them back
(gptoss_hpc.monitor.records), beside data.json's counts of the rows kept, dropped and truncated.
"""

from __future__ import annotations

from typing import Any

from gptoss_hpc.config.flops import peak_tflops
from gptoss_hpc.monitor.records import metric_rows, steady_rate
from gptoss_hpc.paths import PointPaths


def steady_facts(rows: list[dict[str, Any]], device_name: str | None) -> dict[str, Any]:
    """Steady tok/s (all ranks' non-padding tokens) and MFU (rank 0's useful FLOPs on its GPU; None off a GPU, where
    no peak rate is known) from metrics.jsonl's rows."""
    tok_s, steps = steady_rate(rows, "num_input_tokens_seen")
    flops_s, _ = steady_rate(rows, "useful_flops")
    mfu = None if device_name is None or flops_s is None else flops_s / (peak_tflops(device_name) * 1e12)
    return {"steady_tok_s": tok_s, "steady_steps": steps, "steady_mfu": mfu}


def train_run_facts(trainer: Any, paths: PointPaths, world_size: int) -> dict[str, Any]:
    """Rank 0's facts of the training that just ended (call it after trainer.train())."""
    import torch

    device = trainer.args.device
    cuda = device.type == "cuda" and torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if cuda else None
    lines = paths.metrics.read_text(encoding="utf-8", errors="replace").splitlines() if paths.metrics.is_file() else []
    work = getattr(trainer, "useful_work", None)
    return {
        "device_name": name,
        "gpus": world_size if cuda else 0,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
        **steady_facts(metric_rows(lines), name),
        "doc_tokens": work.tokens if work is not None else None,
        "docs": work.docs if work is not None else None,
        "useful_flops": work.flops if work is not None and work.arch is not None else None,
    }
