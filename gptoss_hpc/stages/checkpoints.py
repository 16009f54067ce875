"""Checkpoints that survive faults: written aside, published by a rename, checked before a resume.

transformers writes ``checkpoint-N/`` in place, file by file, so a save cut short (node loss, time limit, a full
disk) leaves a folder that looks like a checkpoint. Here every rank writes into ``<train>/.saving/checkpoint-N``;
after all ranks are done, rank 0 writes ``checkpoint_manifest.json`` (every file's size and SHA-256), syncs the
files to disk and renames the folder to ``<train>/checkpoint-N``: a ``checkpoint-N`` either is whole or does not
exist. Then the older ones beyond ``train.save_total_limit`` are deleted (by step).

On resume, ``latest_checkpoint`` takes the newest ``checkpoint-N`` whose files all match its manifest (adapter,
optimizer, scheduler, RNG states, trainer_state.json with the data position) and names every newer one it skips
and why. A save that fails (a full disk) deletes its half-written folder, leaves the previous checkpoints as they
were, and fails the stage with ``CheckpointSaveError`` saying how much room there was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

MANIFEST = "checkpoint_manifest.json"
STAGING = ".saving"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_DISK_FULL_TEXT = ("No space left", "os error 28", "code: 28", "Disk quota exceeded", "file write failed")


class CheckpointSaveError(GptossHpcError):
    """A checkpoint could not be written; the previous ones are intact."""


def checkpoint_step(d: Path) -> int | None:
    m = _CHECKPOINT_RE.match(d.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(train_dir: Path, warn: Callable[[str], Any] = log.warning) -> Path | None:
    """The newest ``checkpoint-N`` that is whole (see ``problem``); ``warn`` gets one line per newer one skipped."""
    found = sorted(
        ((s, d) for d in (train_dir.glob("checkpoint-*") if train_dir.is_dir() else []) if d.is_dir()
         for s in [checkpoint_step(d)] if s is not None),
        reverse=True,
    )  # fmt: skip
    skipped: list[str] = []
    for step, d in found:
        reason = problem(d, step)
        if reason is None:
            for line in skipped:
                warn(f"{line}; resuming from {d.name} instead")
            return d
        skipped.append(f"skipping checkpoint {d}: {reason}")
    for line in skipped:
        warn(f"{line}; no usable checkpoint is left, training starts at step 0")
    return None


def problem(d: Path, step: int) -> str | None:
    """Why ``d`` cannot be resumed from, or None. With a manifest: every listed file is there, with its size and
    SHA-256, and trainer_state.json says step ``step``. Without one (a checkpoint from before manifests): the HF
    Trainer's last file, trainer_state.json, parses and says that step, weights are there, and DeepSpeed's
    ``latest`` tag (if any) names an existing folder."""
    try:
        state = json.loads((d / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not load ({type(exc).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is not that of step {step}"
    manifest = d / MANIFEST
    if not manifest.is_file():
        if not any(d.glob("*.safetensors")):
            return "no adapter weights (*.safetensors)"
        latest = d / "latest"
        if latest.is_file():
            return None if (d / latest.read_text().strip()).is_dir() else "DeepSpeed's `latest` names no folder"
        return None if (d / "optimizer.pt").is_file() else "no optimizer.pt"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} does not load ({type(exc).__name__})"
    for rel, want in sorted(files.items()):
        path = d / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} is {size:,} bytes, {want['size']:,} were saved (truncated or damaged)"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match the checksum it was saved with (damaged)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def clear_staging(train_dir: Path) -> None:
    """Drop what an interrupted save left under ``.saving`` (rank 0, before training, before any rank saves)."""
    staging = train_dir / STAGING
    if staging.exists():
        log.warning("removing %s: a checkpoint save that never finished", staging)
        shutil.rmtree(staging, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Manifest, fsync, rename ``staged`` to ``final`` (an older ``final``, from a run that went past this step
    and was then resumed from an earlier checkpoint, is replaced)."""
    files = {}
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(staged))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    text = json.dumps({"step": checkpoint_step(final), "files": files}, indent=1) + "\n"
    with (staged / MANIFEST).open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(staged)
    if final.exists():
        old = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)
    _fsync_dir(final.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(train_dir: Path, newest: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest``; delete the ones past it (left by a run that was
    resumed from an earlier checkpoint because they were damaged: this run has moved on from them)."""
    steps = sorted(
        (s, d) for d in train_dir.glob("checkpoint-*") if d.is_dir() for s in [checkpoint_step(d)] if s is not None
    )
    stale = [d for s, d in steps if s > newest]
    kept = [d for s, d in steps if s <= newest]
    for d in stale + kept[: max(0, len(kept) - keep)]:
        log.info("deleting checkpoint %s (train.save_total_limit=%d)", d, keep)
        shutil.rmtree(d, ignore_errors=True)


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(seen) for t in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def save_failed(exc: BaseException, staged: Path, train_dir: Path) -> CheckpointSaveError:
    """The error of a save that failed, after removing its half-written folder (which frees the room the status
    file needs when the disk is full)."""
    free = shutil.disk_usage(train_dir).free if train_dir.exists() else 0
    written = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file()) if staged.exists() else 0
    shutil.rmtree(staged, ignore_errors=True)
    previous = latest_checkpoint(train_dir, warn=log.warning)
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    if _disk_full(exc):
        return CheckpointSaveError(
            f"saving {staged.name} failed: no space left on the filesystem of {train_dir} ({free / 2**20:.1f} MiB "
            f"free after {written / 2**20:.1f} MiB of it were written); {kept}. Free space there (or set run_root to "
            "a larger filesystem) and re-run the same command to resume"
        )
    return CheckpointSaveError(f"saving {staged.name} failed ({type(exc).__name__}: {exc}); {kept}")


def atomic_checkpoint_class(base: type) -> type:
    """``base`` (a transformers Trainer class) whose ``_save_checkpoint`` writes aside and publishes by rename."""

    class AtomicCheckpoints(base):
        _staging_root: str | None = None

        def _get_output_dir(self, trial):
            return self._staging_root or super()._get_output_dir(trial=trial)

        def _save_checkpoint(self, model, trial):
            train_dir = Path(super()._get_output_dir(trial=trial))
            name = f"checkpoint-{self.state.global_step}"
            staged = train_dir / STAGING / name
            self._staging_root = str(staged.parent)
            try:
                super()._save_checkpoint(model, trial)
            except Exception as exc:
                raise save_failed(exc, staged, train_dir) from exc
            finally:
                self._staging_root = None
            self.accelerator.wait_for_everyone()  # every rank's optimizer shard and RNG state is written
            if not self.args.should_save:
                return
            try:
                publish(staged, train_dir / name)
            except Exception as exc:
                raise save_failed(exc, staged, train_dir) from exc
            rotate(train_dir, self.state.global_step, self.args.save_total_limit or 1 << 30)

    return AtomicCheckpoints
