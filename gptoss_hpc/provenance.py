"""What code a launch ran: package version, git commit, and a hash of the installed distributions.

Recorded in launch.json (and the distribution list in the run dir's `environment.txt`), so a result can
be traced to its code even when the checkout has moved on since.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

PACKAGE = "gptoss_hpc"
_PACKAGE_DIR = Path(__file__).resolve().parent


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; run from a source tree)"


def git_state(path: Path = _PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """(commit SHA, whether tracked files differ from it) of the checkout holding `path`; (None, None) if none."""
    try:
        top = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--show-toplevel"], check=True, capture_output=True, text=True,
            timeout=30,
        ).stdout.strip()  # fmt: skip
        if Path(top).resolve() != path.parent:
            return None, None  # an installed copy inside some other repo (a venv in a checkout) has no SHA of ours
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(dirty)


def installed_distributions() -> list[str]:
    """`name==version` of every installed distribution, sorted: what `pip freeze` lists, without pip."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return sorted(seen.values(), key=str.lower)


def collect() -> dict[str, Any]:
    sha, dirty = git_state()
    freeze = installed_distributions()
    return {
        "package_version": package_version(),
        "package_dir": str(_PACKAGE_DIR),
        "git_sha": sha,
        "git_dirty": dirty,
        "freeze_sha256": hashlib.sha256("\n".join(freeze).encode()).hexdigest(),
        "freeze_count": len(freeze),
    }
