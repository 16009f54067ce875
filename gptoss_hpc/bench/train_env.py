"""What ``python -m gptoss_hpc.bench train`` measures its rows against and how it shows them: the card's bf16
matmul rate (MFU's denominator), the software environment of the run, and the text table."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from typing import Any


def measure_peak_tflops(device: str) -> float:
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        env["card_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        with contextlib.suppress(Exception):
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
    return env


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("name", 36),
        ("lora", 10),
        ("micro_batch", 11),
        ("grad_accum", 3),
        ("tokens_per_step", 7),
        ("step_s", 6),
        ("tok_s", 7),
        ("mfu", 5),
        ("peak_alloc_gib", 5),
        ("status", 6),
    ]
    print(" | ".join(f"{c[:w]:>{w}}" for c, w in cols))
    for r in rows:
        if "tok_s" not in r and r.get("status") == "ok":
            continue
        print(" | ".join(f"{r.get(c, '')!s:>{w}}"[: max(w, 1) + 30] for c, w in cols))
