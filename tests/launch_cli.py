"""`python -m gptoss_hpc.launch` run as a user runs it, for the Slurm test modules: the run dir it made, its
manifest (launch.json) and its stdout. A non-zero exit fails the calling test with launch's stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from gptoss_hpc.submission.manifest import Manifest


def launch_run(
    args: list[str], run_root: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> tuple[Path, Manifest, str]:
    """``env`` is the whole environment of the launch (default: this process's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *args, f"run_root={run_root}"],
        capture_output=True,
        text=True,
        env=dict(os.environ if env is None else env),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (manifest_path,) = run_root.glob("*/*/launch.json")
    return manifest_path.parent, Manifest.load(manifest_path.parent), proc.stdout
