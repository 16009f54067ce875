"""GPTOSS_HPC_PROFILE_STEPS: torch.profiler over a range of the train stage's optimizer steps, through the real stage
on CPU (tiny gpt-oss, TRL SFTTrainer + PEFT). On CPU the report has no device rows; the GPU's are the same code."""

from __future__ import annotations

import json

import pytest

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.profiling import PROFILE_ENV, profile_steps
from gptoss_hpc.paths import PointPaths
from tests.test_train_sft import make_point, run_cli


def test_profile_steps_parses_a_range_and_refuses_anything_else():
    assert profile_steps({}) is None
    assert profile_steps({PROFILE_ENV: "6-7"}) == (6, 7)
    assert profile_steps({PROFILE_ENV: " 3 "}) == (3, 3)
    for bad in ("7-6", "0-2", "six", "2-x"):
        with pytest.raises(GptossHpcError, match=rf"{PROFILE_ENV}=.*A-B"):
            profile_steps({PROFILE_ENV: bad})


def test_the_train_stage_writes_a_profile_of_the_named_steps(tmp_path):
    config = make_point(tmp_path, "train.max_steps=4")
    proc = run_cli(config, env={PROFILE_ENV: "2-3"})
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    paths = PointPaths.from_config(config)
    report = (paths.train / "profile.md").read_text()
    assert report.startswith("# Train stage profile: optimizer steps 2-3")
    assert "s per step" in report and "no CUDA device work recorded (CPU run)" in report
    assert "aten::mm" in report or "aten::addmm" in report  # the model's matmuls, in the host table
    assert json.loads(paths.stage_status("train").read_text())["state"] == "COMPLETED"


def test_a_bad_range_fails_the_stage_before_the_model_loads(tmp_path):
    config = make_point(tmp_path, "train.max_steps=2")
    proc = run_cli(config, env={PROFILE_ENV: "3-1"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert f"{PROFILE_ENV}='3-1' is not a step range" in err
    status = json.loads(PointPaths.from_config(config).stage_status("train").read_text())
    assert status["state"] == "FAILED" and PROFILE_ENV in status["error"]
    assert not PointPaths.from_config(config).adapter.exists()
