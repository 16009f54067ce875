"""Hugging Face Hub access: failures (offline, gated, missing) as one error with the fix; the launch-time prefetch;
the one push helper (train: adapter/, merge: merged/) and its repo naming."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss_hpc.errors import GptossHpcError, ResourceNotReachableError

if TYPE_CHECKING:
    from gptoss_hpc.config.schema import RunConfig
    from gptoss_hpc.paths import PointPaths

log = logging.getLogger(__name__)


def is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def unreachable(what: str, name: str, revision: str | None, exc: BaseException, fix: str) -> ResourceNotReachableError:
    """One message naming what failed, why, and what to do next."""
    reason = _reason(exc)
    at = f"@{revision}" if revision else ""
    token = _token_state()
    return ResourceNotReachableError(f"{what} {name}{at} is not reachable ({reason}; {token}). Fix: {fix}")


def _token_state() -> str:
    from gptoss_hpc.submission.secrets import token_file, token_path

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN is set"
    path = token_file()
    if path:
        return f"token from the file {path}"
    return f"no token: HF_TOKEN is not set and {token_path()} does not exist"


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


# The gpt-oss repos also carry the original checkpoint and Metal weights: not what transformers loads.
_MODEL_IGNORE = ["original/*", "metal/*"]
_TOKENIZER_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_LOCAL_TOKENIZERS = ("auto", "offline", "tiny-bpe")


def hub_resources(cfg: RunConfig) -> list[tuple[str, str, str, str | None, dict[str, Any]]]:
    """(what, repo type, repo id, revision, snapshot_download filters) of every Hub repo the jobs will read."""
    out: list[tuple[str, str, str, str | None, dict[str, Any]]] = []
    m = cfg.model
    if not m.tiny and not is_local(m.name_or_path):
        out.append(("model", "model", m.name_or_path, m.revision, {"ignore_patterns": _MODEL_IGNORE}))
    if m.tokenizer not in _LOCAL_TOKENIZERS and not is_local(m.tokenizer):
        out.append(("tokenizer", "model", m.tokenizer, None, {"allow_patterns": _TOKENIZER_FILES}))
    if cfg.data.source == "hub" and cfg.data.name:
        out.append(("dataset", "dataset", cfg.data.name, cfg.data.revision, {}))
    return out


def prefetch(cfg: RunConfig) -> dict[str, str]:
    """Download every Hub repo of this launch into cluster.hf_home, on the submitting host, before sbatch.

    Jobs then read them with HF_HUB_OFFLINE=1 (gptoss_hpc.submission.sbatch.job_env): compute nodes need no
    internet and ranks do not download concurrently after the queue wait. A gated, missing or unreachable
    repo raises ResourceNotReachableError naming it and the fix, so nothing is submitted. Returns the
    local snapshot folder of each (model, tokenizer, dataset).
    """
    from huggingface_hub import snapshot_download

    from gptoss_hpc.submission.secrets import hf_token

    hf_home = Path(str(cfg.cluster.hf_home)).expanduser()
    cache = hf_home / "hub"
    token = hf_token()  # HF_TOKEN, or the token file (HF_TOKEN_PATH / huggingface_hub's saved login)
    folders: dict[str, str] = {}
    for what, repo_type, repo_id, revision, filters in hub_resources(cfg):
        log.info("prefetching %s %s%s into %s", what, repo_id, f"@{revision}" if revision else "", cache)
        try:
            folder = snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, cache_dir=cache, token=token or None, **filters
            )
        except Exception as exc:
            local_key = {"model": "model.name_or_path", "tokenizer": "model.tokenizer"}.get(what, "data.path")
            fix = (
                f"accept the repo's terms on the Hub and give a token (HF_TOKEN, or `hf auth login` / HF_TOKEN_PATH);"
                f" check the name and that this host reaches {_endpoint()}; or download it yourself and point "
                f"{local_key} at the local copy"
            )
            raise unreachable(f"{what} (prefetch into cluster.hf_home)", repo_id, revision, exc, fix) from exc
        folders[what] = folder
    return folders


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# ------------------------------------------------------------------------------------------ pushing


class HubPushError(GptossHpcError):
    """A push was asked for but there is no repo name to push to."""


def should_push(cfg: RunConfig, env: Mapping[str, str]) -> bool:
    """Hub push only with a token (HF_TOKEN or the token file), push_to_hub on, and PUSH_TO_HUB not "false"."""
    from gptoss_hpc.submission.secrets import hf_token, hub_offline

    if hub_offline(env):  # jobs of a cluster.hf_home launch run offline: push from the login node
        return False
    return bool(hf_token(env)) and cfg.train.push_to_hub and env.get("PUSH_TO_HUB", "").lower() != "false"


def hub_repo_id(cfg: RunConfig, paths: PointPaths, env: Mapping[str, str], whoami: Any = None, suffix: str = "") -> str:
    """The repo a point pushes to (train: the adapter, suffix ""; merge: suffix "-merged"):
    <train.hub_model_id>[-<point> in a sweep]<suffix>, else <HF_USER or the token's user>/<name>-<point><suffix>."""
    if cfg.train.hub_model_id:
        base = cfg.train.hub_model_id
        if sum(1 for p in paths.run_dir.glob("p[0-9][0-9][0-9]") if p.is_dir()) > 1:  # a sweep: a repo per point
            base = f"{base}-{paths.root.name}"
        return f"{base}{suffix}"
    user = env.get("HF_USER") or (whoami() if whoami is not None else None)
    if not user:
        raise HubPushError(
            "train.push_to_hub is on but neither train.hub_model_id nor HF_USER is set; set one, "
            "or export PUSH_TO_HUB=false"
        )
    return f"{user}/{cfg.name}-{paths.root.name}{suffix}"


def push_folder(cfg: RunConfig, paths: PointPaths, folder: Path, *, what: str, suffix: str = "") -> str | None:
    """Upload ``folder`` as a private model repo (name: hub_repo_id) with the env's HF_TOKEN (never written
    anywhere); None when no push is asked for. Raises GptossHpcError on failure: callers make it a warning,
    the folder is saved either way."""
    from gptoss_hpc.submission.secrets import hf_token, hub_offline

    if not should_push(cfg, os.environ):
        if hub_offline() and hf_token() and cfg.train.push_to_hub:
            log.warning("HF_HUB_OFFLINE=1: %s not pushed; upload it with `hf upload <repo> %s`", what, folder)
        return None
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = None
    try:
        repo_id = hub_repo_id(cfg, paths, os.environ, whoami=lambda: api.whoami()["name"], suffix=suffix)
        log.info("pushing %s to the Hub as %s (private)", folder, repo_id)
        api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"{cfg.name} {what}")
    except HubPushError:
        raise
    except Exception as exc:
        raise unreachable(
            "Hub repo", repo_id or "<HF_USER>/…", None, exc, "check HF_TOKEN has write access, or PUSH_TO_HUB=false"
        ) from exc
    log.info("pushed the %s to https://huggingface.co/%s", what, repo_id)
    return repo_id
