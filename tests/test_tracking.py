"""W&B in the train stage can only cost a warning. Real wandb client; W&B's server is faked by a closed local
port in WANDB_BASE_URL (what a compute node without network sees)."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from gptoss_hpc import stage_warnings
from gptoss_hpc.modeling import tracking
from gptoss_hpc.paths import PointPaths


@pytest.fixture
def point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PointPaths:
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "gptoss-test")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "testkey1")
    stage_warnings.clear()
    (tmp_path / "p000").mkdir()
    return PointPaths(tmp_path / "p000")


@pytest.mark.slow  # waits out WANDB_INIT_TIMEOUT
def test_unreachable_wandb_falls_back_to_offline_files(point: PointPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")  # closed: connection refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    try:
        assert tracking.start_wandb(point, "demo-p000") is True
    finally:
        tracking.finish_wandb()
    (warning,) = stage_warnings.collected()
    assert warning.startswith("wandb: online run failed (") and "wandb sync" in warning
    runs = list((point.root / "wandb").glob("offline-run-*"))
    assert runs and str(runs[0]) in warning
    assert "testkey1" not in warning


def test_wandb_not_installed_is_a_warning(point: PointPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert tracking.start_wandb(point, "demo-p000") is False
    assert stage_warnings.collected() == [
        "wandb: WANDB_API_KEY is set but wandb is not installed (pip install 'gptoss_hpc[wandb]'); "
        "logging to TensorBoard only"
    ]
