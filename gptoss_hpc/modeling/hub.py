"""Turn Hugging Face Hub failures (offline, gated, missing) into one ResourceNotReachableError with the fix."""

from __future__ import annotations

import os
from pathlib import Path

from gptoss_hpc.errors import ResourceNotReachableError


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def unreachable(what: str, name: str, revision: str | None, exc: BaseException, fix: str) -> ResourceNotReachableError:
    """One message naming what failed, why, and what to do next."""
    reason = _reason(exc)
    at = f"@{revision}" if revision else ""
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    return ResourceNotReachableError(f"{what} {name}{at} is not reachable ({reason}; {token}). Fix: {fix}")


def _reason(exc: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):
            return "gated repo: accept its license on huggingface.co and export HF_TOKEN"
        if isinstance(e, RepositoryNotFoundError):
            return "no such repo on the Hub, or it is private and needs HF_TOKEN"
        if isinstance(e, RevisionNotFoundError):
            return "no such revision"
        if isinstance(e, OfflineModeIsEnabled | LocalEntryNotFoundError):
            return "offline (HF_HUB_OFFLINE or no network) and not in the local cache"
    first = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return first[:300]


def check_hub_repo(what: str, name: str, revision: str | None, fix: str) -> None:
    """Raise ResourceNotReachableError unless `name` is a local path or a Hub repo we can read."""
    if is_local(name):
        return
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, revision=revision)
    except Exception as exc:
        if _in_local_cache(name, revision):
            return
        raise unreachable(what, name, revision, exc, fix) from exc


def _in_local_cache(name: str, revision: str | None) -> bool:
    """True when the repo's config.json is in the local HF cache (offline clusters pre-download)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:
        return False
    return isinstance(hit, str)
