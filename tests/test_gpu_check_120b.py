"""The GPU check's pipeline120b phase: what it decides on its own (the full CPU form, `bash launchers/gpu_check.sh
--cpu --work W pipeline120b`, takes ~70 s here and is run by hand; the phase's stages are the ones
tests/test_mxfp4_stages.py runs). Real: the state file and folders on disk; faked: the disk's free space (no
128 GB disk here) through shutil.disk_usage."""

from __future__ import annotations

import json
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest

from gptoss_hpc.bench import gpu_check_120b
from gptoss_hpc.bench.gpu_check import Check, base_overrides


def _check(work: Path) -> Check:
    return Check(cpu=True, work=work, budget_s=500, hard_s=560, steps=4, warmup=1, started=time.time(), rows=[])


def _done_until(work: Path, steps: list[str]) -> Path:
    """A work dir as an earlier command left it: the checkpoint folder, a point, and the steps it finished."""
    ckpt = work / "ckpt-120b-full"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors.index.json").write_text("{}")
    (ckpt / "model-00000-of-00001.safetensors").write_bytes(b"0" * 1000)
    point = work / "runs" / "p000"
    point.mkdir(parents=True)
    done = {s: {"phase": "pipeline120b", "name": f"{s}: earlier", "result": "pass"} for s in steps}
    (work / "pipeline120b.json").write_text(json.dumps({"done": done, "point": str(point)}))
    return point


def _no_launch(*args, **kwargs):
    pytest.fail("a step an earlier command finished was run again")


def test_a_second_command_goes_on_where_the_first_stopped(tmp_path):
    c = _check(tmp_path)
    _done_until(tmp_path, ["train", "eval", "serve", "merge"])
    gpu_check_120b.phase_pipeline120b(c, _no_launch, base_overrides, "")
    assert [r["name"] for r in c.rows] == ["train: earlier", "eval: earlier", "serve: earlier", "merge: earlier"]
    assert all(r["note"] == "earlier command" for r in c.rows)


def test_the_merge_is_not_started_without_disk_for_it(tmp_path, monkeypatch):
    c = _check(tmp_path)
    _done_until(tmp_path, ["train", "eval", "serve"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**11, 10**11 - 10**9, 10**9))
    gpu_check_120b.phase_pipeline120b(c, _no_launch, base_overrides, "")
    need = gpu_check_120b.DISK_MARGIN / 1e9  # the (empty) test checkpoint + the margin
    assert c.rows[-1]["result"] == f"not run (disk: 1 GB free, needs ~{need:.0f} GB)", c.rows[-1]
    state = json.loads((tmp_path / "pipeline120b.json").read_text())
    assert "merge" not in state["done"]


def test_the_120b_command_line_is_the_shipped_120b_preset_from_the_folder(tmp_path):
    c = _check(tmp_path)
    c.cpu = False
    ov = gpu_check_120b._overrides(c, base_overrides(c, tmp_path / "ckpt", 1), 12)
    assert "model=gpt_oss_120b" in ov and not any(o.startswith("model=gpt_oss_20b") for o in ov)
    assert ov.count("train.max_steps=4") == 1 and "merge.format=mxfp4" in ov and "model.num_hidden_layers=12" in ov


def test_a_local_gpu_job_keeps_the_gpu_the_check_was_pinned_to(tmp_path, monkeypatch):
    """`CUDA_VISIBLE_DEVICES=1 bash launchers/gpu_check.sh ...` beside another run on GPU 0: the local jobs must see
    GPU 1 (submitit numbers them from 0 unless told). Real: submitit's LocalExecutor and its job process."""
    import os

    import submitit

    from gptoss_hpc.config import compose, to_run_config
    from gptoss_hpc.submission.sbatch import local_parameters

    cfg = to_run_config(compose(["cluster=local", "cluster.accelerator=gpu", "cluster.gpus_per_node=1"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    for stage in ("train", "merge"):
        executor = submitit.LocalExecutor(folder=tmp_path / stage)
        executor.update_parameters(**local_parameters(cfg, stage))
        assert executor.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result() == "1", stage
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "visible_gpus" not in local_parameters(cfg, "train")
