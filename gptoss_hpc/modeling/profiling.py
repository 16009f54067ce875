"""``GPTOSS_HPC_PROFILE_STEPS=A-B``: torch.profiler over optimizer steps A..B of the train stage, on rank 0.

The bench (``python -m gptoss_hpc.bench train --profile FILE``) times the model alone; this profiles what the train
stage adds around it: TRL's collator and loss, DeepSpeed's hooks and step, the dataloader. It writes
``<point>/train/profile.md``: the steps' wall time, the time the GPU spent in kernels and copies (the rest of the
wall is the GPU waiting for the host), the synchronizing CUDA calls by Python stack (each drains the GPU's queue),
and the top operators by host and by device time. An environment variable,
not a config key: a diagnostic that changes no result (``GPTOSS_HPC_PROFILE_STEPS=6-7 bash launchers/gpu_check.sh
fit:20b@26`` passes it to the job)."""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)
PROFILE_ENV = "GPTOSS_HPC_PROFILE_STEPS"
TOP_ROWS = 40


def profile_steps(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(first, last) optimizer step to profile, from ``GPTOSS_HPC_PROFILE_STEPS`` ("A-B" or "A"); None if unset."""
    spec = (os.environ if env is None else env).get(PROFILE_ENV, "").strip()
    if not spec:
        return None
    first, _, last = spec.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        a = b = 0
    if a < 1 or b < a:
        raise GptossHpcError(
            f"{PROFILE_ENV}={spec!r} is not a step range: use A-B with 1 <= A <= B (optimizer steps, e.g. 6-7, "
            "after the compile warm-up), or unset it"
        )
    return a, b


def profile_callback(out_dir: Path, env: Mapping[str, str] | None = None):
    """A TrainerCallback that profiles the steps ``GPTOSS_HPC_PROFILE_STEPS`` names (None when it is unset)."""
    steps = profile_steps(env)
    if steps is None:
        return None
    from transformers import TrainerCallback

    first, last = steps

    class ProfileCallback(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.syncs = SyncStacks()
            self.started = 0.0
            self.written: Path | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.prof is None and state.is_world_process_zero and state.global_step + 1 == first:
                import torch
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                _sync()
                self.syncs = SyncStacks().start()
                self.prof = profile(activities=acts)
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step >= last:
                self._finish(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:  # training ended inside the range
                self._finish(state.global_step)

        def _finish(self, step: int) -> None:
            _sync()
            wall = time.perf_counter() - self.started
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
            syncs = self.syncs.stop()
            self.written = write_report(prof, out_dir / "profile.md", first, step, wall, syncs)
            log.info("profile of optimizer steps %d-%d: %s", first, step, self.written)

    return ProfileCallback()


class SyncStacks:
    """Counts the synchronizing CUDA calls (``.item()``, ``.tolist()``, ``nonzero``, device-to-host copies) made from
    Python between ``start`` and ``stop``, by the innermost frames of their stack: torch's sync debug mode warns at
    each, and the warning is caught here instead of printed. Each one empties the GPU's queue, so a host-bound step
    pays the host's launch latency again after it. Nothing is recorded without CUDA."""

    FRAMES = 4

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._saved: tuple | None = None

    def start(self) -> SyncStacks:
        import torch

        if not torch.cuda.is_available():
            return self
        self._saved = (warnings.showwarning, warnings.filters[:], torch.cuda.get_sync_debug_mode())
        warnings.filterwarnings("always", message=".*synchroniz.*")
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def stop(self) -> Counter[str] | None:
        if self._saved is None:
            return None
        import torch

        show, filters, mode = self._saved
        self._saved = None
        torch.cuda.set_sync_debug_mode(mode)
        warnings.showwarning = show
        warnings.filters[:] = filters
        return self.counts

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._saved[0](message, category, filename, lineno, file, line) if self._saved else None
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(("warnings.py", __file__))]
        self.counts[" <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[-self.FRAMES :][::-1])] += 1


def sync_lines(syncs: Counter[str], steps: int) -> list[str]:
    """``SyncStacks``' counts as a markdown section, per step, the most frequent call sites first."""
    lines = [f"## Synchronizing CUDA calls from Python: {sum(syncs.values()) / steps:.0f} per step", ""]
    return lines + ([f"- {n / steps:g} per step: `{where}`" for where, n in syncs.most_common(15)] or ["- none"])


def _short(path: str) -> str:
    for marker in ("site-packages/", "gptoss_hpc/"):
        if marker in path:
            return (marker if marker == "gptoss_hpc/" else "") + path.split(marker, 1)[1]
    return path


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def device_busy_s(prof: Any) -> float:
    """Seconds of device work (kernels, copies, memsets) the profiler saw, summed over streams."""
    from torch.autograd import DeviceType

    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6


def write_report(
    prof: Any, path: Path, first: int, last: int, wall_s: float, syncs: Counter[str] | None = None
) -> Path:
    busy = device_busy_s(prof)
    avg = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(next(iter(avg), None), "self_device_time_total") else None
    lines = [
        f"# Train stage profile: optimizer steps {first}-{last}",
        "",
        f"- wall: {wall_s:.3f} s ({wall_s / (last - first + 1):.3f} s per step)",
    ]
    if busy:
        lines.append(
            f"- device busy (kernels + copies, summed over streams): {busy:.3f} s = {busy / wall_s:.0%} of the wall; "
            f"the rest ({max(wall_s - busy, 0):.3f} s) is the GPU waiting for the host"
        )
    else:
        lines.append("- no CUDA device work recorded (CPU run)")
    if syncs is not None:
        lines += ["", *sync_lines(syncs, last - first + 1)]
    lines += ["", "## Top operators by host (self CPU) time", "", "```"]
    lines.append(avg.table(sort_by="self_cpu_time_total", row_limit=TOP_ROWS, max_name_column_width=80))
    lines.append("```")
    if busy and device_key:
        lines += ["", "## Top operators by device time", "", "```"]
        lines.append(avg.table(sort_by=device_key, row_limit=TOP_ROWS, max_name_column_width=80))
        lines.append("```")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
