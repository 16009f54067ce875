"""Secrets reach jobs through the submitting shell's environment or a token file, never through our files.

sbatch exports the submitting environment to the job (its default, --export=ALL), and submitit's local
executor passes it to its processes. So nothing of ours ever writes a secret's value: configs hold none
(validation refuses them in cluster.env), sbatch scripts hold none, pickles hold only a config path.

The Hub token can instead stay in a file (huggingface_hub's own `hf auth login` file, or any file named by
HF_TOKEN_PATH): then no secret is in the job's environment, which Slurm keeps in its state directory. Jobs
read it where huggingface_hub does: HF_TOKEN, else the file at HF_TOKEN_PATH, else $HF_HOME/token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HF_USER", "SERVE_API_KEY")


def present() -> list[str]:
    """Names (never values) of the secrets the jobs will inherit."""
    return [name for name in SECRET_ENV if os.environ.get(name)]


def token_path(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub looks for a saved token: HF_TOKEN_PATH, else $HF_HOME/token (default home)."""
    env = os.environ if env is None else env
    if env.get("HF_TOKEN_PATH"):
        return Path(env["HF_TOKEN_PATH"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(env.get("HF_HOME") or Path(cache) / "huggingface").expanduser() / "token"


def token_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The token file huggingface_hub would read, when it exists and holds a token."""
    path = token_path(env)
    try:
        return path if path.is_file() and path.read_text().strip() else None
    except OSError:
        return None


def hf_token(env: Mapping[str, str] | None = None) -> str | None:
    """The Hub token as huggingface_hub resolves it (env first, then the token file); None without one."""
    env = os.environ if env is None else env
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(name):
            return env[name]
    path = token_file(env)
    return path.read_text().strip() if path else None


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """HF_HUB_OFFLINE set (jobs of a launch with cluster.hf_home): nothing can be pushed from here."""
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def values() -> list[str]:
    """The secret values set now: for leak checks (tests, the launcher's own self-check)."""
    found = [v for name in SECRET_ENV if (v := os.environ.get(name)) and len(v) >= 8]
    token = hf_token()
    if token and len(token) >= 8 and token not in found:
        found.append(token)
    return found


_JWT_RE = re.compile(r"[\w-]+\.[\w-]+\.[\w-]+")


def wandb_key_problem(key: str) -> str | None:
    """wandb's own format rule (wandb.sdk.lib.wbauth.validation.check_api_key, 0.31): a JWT, or an optional
    on-prem "<prefix>-" then 40+ of [A-Za-z0-9_-]. wandb refuses anything else inside the job; we refuse it
    before submitting. The message never holds the key."""
    if _JWT_RE.fullmatch(key):
        return None
    secret = key.split("-", 1)[-1]
    if not re.fullmatch(r"[\w-]+", secret):
        return "holds characters other than letters, digits, '_' and '-'"
    if len(secret) < 40:
        return f"is {len(secret)} characters long; W&B API keys have 40 or more"
    return None


def problems(env: Mapping[str, str] | None = None) -> list[str]:
    """Secrets that are set but malformed, named (never shown), each with the fix: checked at launch."""
    env = os.environ if env is None else env
    found = []
    key = env.get("WANDB_API_KEY")
    if key and (why := wandb_key_problem(key)):
        found.append(
            f"WANDB_API_KEY {why}, so W&B would refuse it in every job: copy it again from "
            "https://wandb.ai/authorize, or `unset WANDB_API_KEY` to log to TensorBoard only"
        )
    return found
