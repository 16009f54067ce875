"""Shared fixtures.

`local_slurm` starts (or reuses) the real one-node Slurm from `launchers/local_slurm.sh` once per session
and sets SLURM_CONF. Every test marked `@pytest.mark.slurm` gets it automatically. If Slurm cannot
start, those tests FAIL: a Slurm test must never pass or skip silently.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO_ROOT / "launchers" / "local_slurm.sh"
EXPORT_PREFIX = "export SLURM_CONF="


@pytest.fixture(scope="session")
def local_slurm() -> Path:
    """Path of the running local cluster's slurm.conf (also exported as SLURM_CONF)."""
    try:
        proc = subprocess.run(
            ["bash", str(LOCAL_SLURM), "start"],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{LOCAL_SLURM} start did not finish in {exc.timeout} s:\n{exc.stderr or ''}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(EXPORT_PREFIX):
        pytest.fail(
            f"local Slurm did not start: `bash {LOCAL_SLURM} start` exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    conf = Path(lines[-1].removeprefix(EXPORT_PREFIX).strip())
    if not conf.is_file():
        pytest.fail(f"{LOCAL_SLURM} start printed {lines[-1]!r}, but {conf} does not exist")
    os.environ["SLURM_CONF"] = str(conf)
    return conf


@pytest.fixture(autouse=True)
def _slurm_marker_needs_cluster(request: pytest.FixtureRequest) -> None:
    """Tests marked `slurm` get the running cluster even if they do not ask for `local_slurm`."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("local_slurm")
