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


def test_sync_stacks_count_each_synchronizing_call_by_its_python_caller():
    """torch's sync debug mode warns at each synchronizing CUDA call (GPU only); here the warning it raises is
    raised by hand, through the real warnings machinery, from two call sites."""
    import warnings

    from gptoss_hpc.modeling.profiling import SyncStacks

    shown: list[str] = []
    saved_show, saved_filters = warnings.showwarning, warnings.filters[:]
    stacks = SyncStacks()
    stacks._saved = (lambda message, *a, **k: shown.append(str(message)), saved_filters, 0)  # as start() keeps them
    warnings.filterwarnings("always")
    warnings.showwarning = stacks._show

    def loss_item():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def grad_norm():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    try:
        for _ in range(3):
            loss_item()
        grad_norm()
        warnings.warn("unrelated", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning, warnings.filters[:] = saved_show, saved_filters
        stacks._saved = None
    counts = {k.split(" <- ")[0]: n for k, n in stacks.counts.items()}
    assert sorted(counts.values()) == [1, 3], stacks.counts
    assert any(k.endswith(" loss_item") and n == 3 for k, n in counts.items()), counts
    assert all("test_profiling.py" in k for k in counts), counts
    assert shown == ["unrelated"]  # other warnings go on to the handler that was there


def test_the_report_lists_syncs_per_step(tmp_path):
    from collections import Counter

    import torch

    from gptoss_hpc.modeling.profiling import write_report

    with torch.profiler.profile() as prof:
        torch.ones(4).sum()
    path = write_report(prof, tmp_path / "p.md", 8, 9, 1.0, Counter({"loss.py:130 chunked_causal_lm_loss": 8}))
    text = path.read_text()
    assert "Synchronizing CUDA calls from Python: 4 per step" in text
    assert "- 4 per step: `loss.py:130 chunked_causal_lm_loss`" in text
