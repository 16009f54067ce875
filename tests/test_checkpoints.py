"""Checkpoints survive faults: a save cut short never looks complete, a resume skips a truncated or damaged
checkpoint (a stage warning naming it) and takes the previous one, and a save on a full disk fails the stage with a
clear error while the previous checkpoint stays intact.

Real: the train stage (TRL SFTTrainer on the tiny gpt-oss, one process), a real tmpfs of fixed size (mounted by
the test: CI runs as root; it fails, not skips, where it cannot mount). The faults: a save interrupted by an
exception raised from inside transformers' RNG-state save (what a kill at that moment leaves), bytes cut off or
changed in a saved file, a filler file that leaves less room than a checkpoint needs. The test-only hook
GPTOSS_HPC_TEST_RAISE_AT stops a first run after its checkpoints.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths
from gptoss_hpc.stages.checkpoints import MANIFEST, STAGING, CheckpointSaveError, latest_checkpoint, problem
from gptoss_hpc.stages.train import FAULT_ENV, InjectedFault

pytestmark = pytest.mark.slow

MAX_STEPS = 6


def _point(tmp_path: Path, *overrides: str) -> PointPaths:
    cfg = validate(
        to_run_config(
            compose(["experiment=demo", "model.tokenizer=tiny-bpe", "train.max_length=256",
                     f"train.max_steps={MAX_STEPS}", "train.save_steps=2", "train.save_total_limit=3", *overrides])
        )
    )  # fmt: skip
    return PointPaths.from_config(save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml"))


def _train(paths: PointPaths, monkeypatch, stop_after: int | None = None) -> None:
    from gptoss_hpc.stages import train

    if stop_after is None:
        monkeypatch.delenv(FAULT_ENV, raising=False)
        train.main(paths.config)
        return
    monkeypatch.setenv(FAULT_ENV, f"0:{stop_after}")
    with pytest.raises(InjectedFault):
        train.main(paths.config)
    monkeypatch.delenv(FAULT_ENV)


def _metrics(paths: PointPaths) -> list[dict]:
    return [json.loads(x) for x in paths.metrics.read_text().splitlines()]


def _resumed_then_first_step(paths: PointPaths) -> tuple[dict, int]:
    rows = _metrics(paths)
    (i,) = [i for i, r in enumerate(rows) if r.get("event") == "resumed"]
    return rows[i], next(r["step"] for r in rows[i + 1 :] if "loss" in r)


def test_a_truncated_or_damaged_checkpoint_is_skipped_and_the_previous_one_resumed(tmp_path, monkeypatch):
    paths = _point(tmp_path)
    _train(paths, monkeypatch, stop_after=5)  # checkpoints 2 and 4, then an error at step 5
    ckpt2, ckpt4 = paths.train / "checkpoint-2", paths.train / "checkpoint-4"
    assert latest_checkpoint(paths.train) == ckpt4 and problem(ckpt2, 2) is None
    manifest = json.loads((ckpt4 / MANIFEST).read_text())["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        manifest
    )

    damaged = tmp_path / "damaged"  # the same bytes count, one byte changed: only the checksum sees it
    subprocess.run(["cp", "-a", str(ckpt4), str(damaged)], check=True)
    blob = bytearray((damaged / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (damaged / "adapter_model.safetensors").write_bytes(bytes(blob))
    assert "adapter_model.safetensors does not match the checksum" in problem(damaged, 4)

    optimizer = ckpt4 / "optimizer.pt"
    size = optimizer.stat().st_size
    with optimizer.open("r+b") as f:
        f.truncate(size // 2)
    warnings: list[str] = []
    assert latest_checkpoint(paths.train, warn=warnings.append) == ckpt2
    assert warnings == [
        f"skipping checkpoint {ckpt4}: optimizer.pt is {size // 2:,} bytes, {size:,} were saved (truncated or "
        "damaged); resuming from checkpoint-2 instead"
    ]

    _train(paths, monkeypatch)
    resumed, first = _resumed_then_first_step(paths)
    assert resumed["checkpoint"] == str(ckpt2) and resumed["resumed_step"] == 2 and first == 3
    status = json.loads(paths.stage_status("train").read_text())
    assert status["state"] == "COMPLETED" and warnings[0] in status["warnings"]
    m = json.loads(paths.train_metrics.read_text())
    assert m["resumed_from"] == str(ckpt2) and m["resumed_step"] == 2 and m["global_step"] == MAX_STEPS
    assert problem(ckpt4, 4) is None  # saved again, whole, by the resumed run


def test_a_save_cut_short_never_looks_complete(tmp_path, monkeypatch):
    from transformers import Trainer

    paths = _point(tmp_path)
    real = Trainer._save_rng_state

    def killed_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed mid-save")  # what SIGINT/SIGKILL at this moment leaves on disk
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _train(paths, monkeypatch)
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    assert (paths.train / STAGING / "checkpoint-4" / "optimizer.pt").is_file()  # half-written, aside
    assert not (paths.train / "checkpoint-4").exists()
    assert latest_checkpoint(paths.train) == paths.train / "checkpoint-2"

    _train(paths, monkeypatch)
    resumed, first = _resumed_then_first_step(paths)
    assert resumed["resumed_step"] == 2 and first == 3
    assert not (paths.train / STAGING / "checkpoint-4").exists()
    assert json.loads(paths.train_metrics.read_text())["global_step"] == MAX_STEPS


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MiB tmpfs; root is needed (CI runs as root): a failure to mount fails the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {mount} (the disk-full test needs root, as on CI): {proc.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, small_fs):
    paths = _point(tmp_path)
    paths.train.parent.mkdir(parents=True, exist_ok=True)
    paths.train.symlink_to(small_fs, target_is_directory=True)  # train/ (checkpoints, TensorBoard) on the tmpfs
    _train(paths, monkeypatch, stop_after=3)  # checkpoint-2
    ckpt2 = paths.train / "checkpoint-2"
    need = sum(p.stat().st_size for p in ckpt2.rglob("*") if p.is_file())
    import shutil

    free = shutil.disk_usage(small_fs).free
    (small_fs / "filler").write_bytes(b"\0" * (free - need // 3))  # room for a third of the next checkpoint

    from gptoss_hpc.stages import train

    with pytest.raises(CheckpointSaveError) as err:
        train.main(paths.config)
    assert str(err.value).startswith(f"saving checkpoint-4 failed: no space left on the filesystem of {paths.train}")
    assert f"the previous checkpoint {ckpt2} is intact" in str(err.value)
    status = json.loads(paths.stage_status("train").read_text())
    assert status["state"] == "FAILED" and status["error"].startswith("CheckpointSaveError: saving checkpoint-4 failed")
    assert problem(ckpt2, 2) is None and latest_checkpoint(paths.train) == ckpt2
    assert not (paths.train / "checkpoint-4").exists() and not (paths.train / STAGING / "checkpoint-4").exists()

    (small_fs / "filler").unlink()  # room again: the same command resumes from checkpoint-2 and finishes
    _train(paths, monkeypatch)
    assert json.loads(paths.train_metrics.read_text())["global_step"] == MAX_STEPS
