"""Secrets travel only through the environment of the submitting shell, never through files.

sbatch exports the submitting environment to the job (its default, --export=ALL), and submitit's local
executor passes it to its processes. So nothing of ours ever writes a secret's value: configs hold none
(validation refuses them in cluster.env), sbatch scripts hold none, pickles hold only a config path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HF_USER")


def present() -> list[str]:
    """Names (never values) of the secrets the jobs will inherit."""
    return [name for name in SECRET_ENV if os.environ.get(name)]


def values() -> list[str]:
    """The secret values set now: for leak checks (tests, the launcher's own self-check)."""
    return [v for name in SECRET_ENV if (v := os.environ.get(name)) and len(v) >= 8]


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
