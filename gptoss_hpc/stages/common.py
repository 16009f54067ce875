"""What every stage does around its body: read the point's config, record status, never swallow errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gptoss_hpc.config import RunConfig, load_run_config
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.paths import PointPaths

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_status(paths: PointPaths, stage: str, state: str, **extra: object) -> None:
    """status/<stage>.json: read by the report and status tools (rank 0 only)."""
    if not is_rank_zero():
        return
    paths.status.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "state": state, "host": socket.gethostname(), "time": time.time(), **extra}
    write_atomic(paths.stage_status(stage), json.dumps(record, indent=2) + "\n")


def run_stage(stage: str, config_path: str | Path, body: Callable[[RunConfig, PointPaths], T]) -> T:
    """Run a stage body; on any exception record FAILED with the error line and re-raise (non-zero exit,
    so Slurm's afterok/aftercorr dependents do not start on a broken result)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = PointPaths.from_config(config_path)
    cfg = load_run_config(paths.config)
    write_status(paths, stage, "RUNNING")
    try:
        result = body(cfg, paths)
    except BaseException as exc:
        write_status(
            paths,
            stage,
            "FAILED",
            error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500] if str(exc) else type(exc).__name__,
            traceback=traceback.format_exc()[-4000:],
        )
        raise
    write_status(paths, stage, "COMPLETED")
    return result
