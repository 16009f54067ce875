"""A diverging run stops: a NaN loss ends the train stage FAILED at that optimizer step, before its checkpoint, with
the step, the learning rate and the last good checkpoint; the merge and eval of that point never run.

Real: TRL SFTTrainer on the tiny gpt-oss (one process here; two CPU ranks over gloo through the launcher's local
backend in tests/test_faults_local.py). The fault: the test-only hook GPTOSS_HPC_TEST_NAN_AT multiplies that
rank's loss by NaN inside a real training step, so the gradients and the gradient norm become NaN as well.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.errors import ConfigError
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.divergence import NAN_ENV, Diverged, DivergenceGuard


def _guard(factor: float = 0.0, steps: int = 3) -> DivergenceGuard:
    cfg = to_run_config(compose([f"train.divergence_spike_factor={factor}", f"train.divergence_spike_steps={steps}"]))
    return DivergenceGuard(cfg, lambda: "train/checkpoint-4")


def test_a_non_finite_loss_or_gradient_norm_stops_with_step_rate_and_checkpoint():
    guard = _guard()
    guard.check(1, 2.5, 1.0, 2e-4)
    with pytest.raises(Diverged, match=r"^loss became NaN at step 5 \(learning rate 0.0002\); last good "
                       r"checkpoint: train/checkpoint-4\."):  # fmt: skip
        guard.check(5, math.nan, 1.0, 2e-4)
    with pytest.raises(Diverged, match=r"^gradient norm became inf at step 6 "):
        guard.check(6, 2.0, math.inf, 2e-4)


def test_the_spike_rule_needs_several_logged_steps_in_a_row():
    guard = _guard(factor=10, steps=3)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0], start=1):
        guard.check(step, loss, 1.0, 1e-4)
    guard.check(5, 50.0, 1.0, 1e-4)  # one spike, then back: not a divergence
    guard.check(6, 2.0, 1.0, 1e-4)
    guard.check(7, 40.0, 1.0, 1e-4)
    guard.check(8, 45.0, 1.0, 1e-4)
    with pytest.raises(Diverged, match=r"^loss spiked at step 9: 60 is above 10x the median 2 "):
        guard.check(9, 60.0, 1.0, 1e-4)
    assert not _guard(factor=0).spike_factor  # off by default


def test_the_keys_are_validated():
    with pytest.raises(ConfigError) as err:
        validate(to_run_config(compose(["train.divergence_spike_factor=0.5", "train.divergence_spike_steps=0"])))
    assert "train.divergence_spike_factor must be 0 (off) or > 1" in str(err.value)
    assert "train.divergence_spike_steps must be >= 1" in str(err.value)


def _point(tmp_path: Path, *overrides: str) -> Path:
    cfg = validate(
        to_run_config(
            compose(["experiment=demo", "model.tokenizer=tiny-bpe", "train.max_length=256", "train.max_steps=12",
                     "train.save_steps=2", *overrides])
        )
    )  # fmt: skip
    return save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("logging_steps", [1, 4], ids=["logged-loss", "device-flag"])
def test_a_nan_loss_ends_the_train_stage_at_that_step(tmp_path, monkeypatch, logging_steps):
    """logging_steps=1: the logged (already gathered) loss; 4: the per-step device flag between logs."""
    from gptoss_hpc.stages import train

    monkeypatch.setenv(NAN_ENV, "0:3")
    config = _point(tmp_path, f"train.logging_steps={logging_steps}")
    paths = PointPaths.from_config(config)
    with pytest.raises(Diverged):
        train.main(config)
    status = json.loads(paths.stage_status("train").read_text())
    assert status["state"] == "FAILED"
    assert status["error"].startswith("Diverged: loss became NaN at step 3 (learning rate ")
    assert f"last good checkpoint: {paths.train / 'checkpoint-2'}." in status["error"]
    assert sorted(p.name for p in paths.train.glob("checkpoint-*")) == ["checkpoint-2"]  # none after the NaN
    assert not (paths.adapter / "adapter_config.json").exists()
    if logging_steps == 1:
        rows = [json.loads(x) for x in paths.metrics.read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and math.isnan(rows[-1]["loss"])


@pytest.mark.slow
def test_stop_on_divergence_false_trains_on(tmp_path, monkeypatch):
    from gptoss_hpc.stages import train

    monkeypatch.setenv(NAN_ENV, "0:2")
    config = _point(tmp_path, "train.stop_on_divergence=false", "train.max_steps=3", "train.save_steps=100")
    train.main(config)
    paths = PointPaths.from_config(config)
    assert json.loads(paths.stage_status("train").read_text())["state"] == "COMPLETED"


def test_the_hooks_take_a_point(monkeypatch):
    from gptoss_hpc.errors import GptossHpcError
    from gptoss_hpc.stages.divergence import rank_step

    assert rank_step(NAN_ENV, "p000") is None
    monkeypatch.setenv(NAN_ENV, "1:3")
    assert rank_step(NAN_ENV, "p000") == rank_step(NAN_ENV, "p007") == (1, 3)
    monkeypatch.setenv(NAN_ENV, "1:3:p002")
    assert rank_step(NAN_ENV, "p002") == (1, 3) and rank_step(NAN_ENV, "p000") is None
    monkeypatch.setenv(NAN_ENV, "one:3")
    with pytest.raises(GptossHpcError, match=r"is not <rank>:<step>\[:<point>\]"):
        rank_step(NAN_ENV, "p000")
