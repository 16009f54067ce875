"""Disk pre-flight (gptoss_hpc.config.disk): a launch that would fill run_root's filesystem is refused before
anything is written or submitted. On the H200 box a full disk failed the 120b train stage in the trainer's final
save, after every step had run (docs/BENCHMARKS.md, 2026-11-29, fa57b65). These run against this machine's real
filesystem: the sweep is sized from its free space."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from gptoss_hpc import launch
from gptoss_hpc.config import compose, to_run_config, validate
from gptoss_hpc.config.disk import disk_problems, point_disk_gib
from gptoss_hpc.config.memory import GIB


def _cfg(*overrides: str):
    return validate(to_run_config(compose(["cluster=coreweave_h200", *overrides])))


def test_estimate_per_stage_follows_the_config():
    base = point_disk_gib(_cfg())
    assert set(base) == {"train", "merge"}
    assert 38 < base["merge"] < 40  # 20b merged in bf16
    assert 0.1 < base["train"] < 2
    # one checkpoint kept instead of two: 2 written at most (the newest before the oldest goes), not 3
    fewer = point_disk_gib(_cfg("train.save_total_limit=1"))["train"]
    assert fewer < base["train"] * 0.75
    assert "merge" not in point_disk_gib(_cfg("stages=[train]"))
    mx = point_disk_gib(_cfg("model=gpt_oss_120b", "merge.format=mxfp4"))
    assert 59 < mx["merge"] < 63  # 60.77 GiB measured on the H200 box


def test_a_sweep_that_does_not_fit_the_disk_is_refused_and_nothing_is_written(tmp_path: Path, capsys):
    run_root = tmp_path / "runs"
    free_gib = shutil.disk_usage(tmp_path).free / GIB
    per_point = point_disk_gib(_cfg())["train"] + point_disk_gib(_cfg())["merge"]
    points = math.ceil(free_gib / per_point) + 1
    seeds = ",".join(str(s) for s in range(points))
    rc = launch.main(["-m", "cluster=coreweave_h200", f"run_root={run_root}", f"train.seed={seeds}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "nothing submitted" in err and f"{points} point(s)" in err and "GiB free" in err, err
    assert "merge" in err and "fewer sweep points" in err, err
    assert not run_root.exists()  # no run dir, no configs, no sbatch


def test_the_same_launch_fits_without_the_merges():
    cfgs = [_cfg("stages=[train]", f"train.seed={s}") for s in range(3)]
    assert disk_problems(cfgs) == []
    assert disk_problems([]) == []


def test_points_are_checked_against_their_own_run_roots_filesystem(tmp_path: Path):
    # A sweep over run_root with its points on two filesystems (here the disk under tmp_path and the tmpfs at
    # /dev/shm): each filesystem holds only its own points. It was checked as a whole against the first point's.
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    small = shm / f"gptoss-disk-test-{tmp_path.name}"  # never created: the check reads the nearest existing parent
    per_point = sum(point_disk_gib(_cfg()).values())
    on_shm = math.ceil(shutil.disk_usage(shm).free / GIB / per_point) + 1
    cfgs = [_cfg(f"run_root={tmp_path / 'runs'}")] + [
        _cfg(f"run_root={small}", f"train.seed={s}") for s in range(on_shm)
    ]
    problems = disk_problems(cfgs)
    shm_problems = [p for p in problems if p.startswith(f"run_root={small}:")]
    assert len(shm_problems) == 1 and f"{on_shm} point(s)" in shm_problems[0], problems
    assert f"but {shm} has" in shm_problems[0], problems
    # the disk's one point is judged alone: refused only if that filesystem cannot hold even it
    disk_alone = shutil.disk_usage(tmp_path).free / GIB >= per_point
    assert any(p.startswith(f"run_root={tmp_path / 'runs'}:") for p in problems) is not disk_alone, problems
    assert not small.exists()
