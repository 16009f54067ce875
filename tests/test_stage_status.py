"""Every stage's status/<stage>.json records wall_s and peak_gpu_gib (null without a GPU), on success and failure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.common import run_stage


def _point(tmp_path: Path) -> PointPaths:
    paths = PointPaths(tmp_path / "p000")
    save_run_config(to_run_config(compose(["experiment=demo", f"run_root={tmp_path}"])), paths.config)
    return paths


def test_completed_stage_records_wall_time_and_no_gpu(tmp_path: Path) -> None:
    paths = _point(tmp_path)
    run_stage("merge", paths.config, lambda cfg, p: time.sleep(0.2))
    status = json.loads(paths.stage_status("merge").read_text())
    assert status["state"] == "COMPLETED"
    assert 0.2 <= status["wall_s"] < 60 and status["peak_gpu_gib"] is None


def test_failed_stage_records_them_too(tmp_path: Path) -> None:
    paths = _point(tmp_path)

    def boom(cfg, p):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage("eval", paths.config, boom)
    status = json.loads(paths.stage_status("eval").read_text())
    assert status["state"] == "FAILED" and "boom" in status["error"]
    assert status["wall_s"] >= 0 and "peak_gpu_gib" in status
