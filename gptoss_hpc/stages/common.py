"""What every stage does around its body: read the point's config, record status, never swallow errors."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from gptoss_hpc.config import RunConfig, load_run_config
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stage_warnings import clear as _clear_warnings
from gptoss_hpc.stage_warnings import collected as _warnings
from gptoss_hpc.stage_warnings import stage_warning as stage_warning  # the stages' name for it

T = TypeVar("T")
log = logging.getLogger(__name__)

# perf_counter() when run_stage started each stage in this process: wall_s in its status records.
_STARTED: dict[str, float] = {}


def peak_gpu_gib() -> float | None:
    """torch.cuda.max_memory_allocated() of this process's current GPU, in GiB; None without a GPU."""
    if "torch" not in sys.modules:  # nothing imported torch: no GPU work, and no reason to import it now
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    if not torch.cuda.is_initialized():
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def peak_host_rss_gib() -> float:
    """This process's peak resident set so far (ru_maxrss, KiB on Linux), in GiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def usage(stage: str) -> dict[str, float | None]:
    """wall_s since the stage started (None outside run_stage), peak_gpu_gib and peak_host_rss_gib so far."""
    started = _STARTED.get(stage)
    wall = None if started is None else round(time.perf_counter() - started, 3)
    return {"wall_s": wall, "peak_gpu_gib": peak_gpu_gib(), "peak_host_rss_gib": peak_host_rss_gib()}


def write_status(paths: PointPaths, stage: str, state: str, **extra: object) -> None:
    """status/<stage>.json: read by the report and status tools (rank 0 only). Every record carries the
    stage's wall_s and peak_gpu_gib so far (rank 0's GPU; null on CPU)."""
    from gptoss_hpc.modeling.distributed import global_rank

    if global_rank() != 0:
        return
    paths.status.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage,
        "state": state,
        "host": socket.gethostname(),
        "time": time.time(),
        **usage(stage),
        **extra,
    }
    write_atomic(paths.stage_status(stage), json.dumps(record, indent=2) + "\n")


def run_stage(stage: str, config_path: str | Path, body: Callable[[RunConfig, PointPaths], T]) -> T:
    """Run a stage body; on any exception record FAILED with the error line and re-raise (non-zero exit,
    so Slurm's afterok/aftercorr dependents do not start on a broken result)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = PointPaths.from_config(config_path)
    cfg = load_run_config(paths.config)
    _STARTED[stage] = time.perf_counter()
    _reset_peak_gpu()
    if stage != "report":
        cap_gpu_memory(cfg)
    write_status(paths, stage, "RUNNING")
    _clear_warnings()
    try:
        result = body(cfg, paths)
    except BaseException as exc:
        write_status(
            paths,
            stage,
            "FAILED",
            error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500] if str(exc) else type(exc).__name__,
            traceback=traceback.format_exc()[-4000:],
            warnings=_warnings(),
        )
        raise
    write_status(paths, stage, "COMPLETED", warnings=_warnings())
    return result


def cap_gpu_memory(cfg: RunConfig) -> float | None:
    """Where ``cluster.gpu_memory_gib`` is below this GPU's memory, cap the CUDA caching allocator at it, so that a
    stage planned (and fitted by train.fit_memory) for that card never relies on more: what passes on an H200 with
    cluster.gpu_memory_gib=80 fits an 80 GB H100, and a GPU shared with another job is not overrun. An allocation
    past the cap raises torch.OutOfMemoryError, as it would on the smaller card. Returns the cap, or None."""
    import os

    want = cfg.cluster.gpu_memory_gib
    if want is None or cfg.cluster.accelerator != "gpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    # the rank's GPU, as the trainer will pick it (setup_distributed, which sets LOCAL_RANK, runs later in the body;
    # with one device visible per task, it is device 0)
    env = os.environ
    local = env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or env.get("SUBMITIT_LOCAL_LOCALID") or "0"
    device = int(local) % torch.cuda.device_count()
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if want >= total:
        return None
    torch.cuda.set_per_process_memory_fraction(want / total, device)
    log.info("cluster.gpu_memory_gib=%g: CUDA allocator capped at %.1f of this GPU's %.1f GiB", want, want, total)
    return float(want)


def free_device_memory() -> None:
    """Give a dropped model's GPU memory back before the next one loads (one model resident at a time)."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _reset_peak_gpu() -> None:
    """A stage run in a process that did GPU work before (tests, a notebook) reports its own peak only."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()


def stage_cli(stage: str, main: Callable[[str], object], argv: Sequence[str] | None, usage: str) -> int:
    """`python -m gptoss_hpc.stages.<stage> CONFIG`: one error line and exit 1 on a known failure, the
    stage's result (a path or metrics) on stdout otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(usage, file=sys.stderr)
        return 2
    try:
        result = main(args[0])
    except GptossHpcError as exc:
        print(f"{stage} failed: {exc}", file=sys.stderr)
        return 1
    if result:
        print(json.dumps(result, indent=2) if isinstance(result, dict) else result)
    return 0
