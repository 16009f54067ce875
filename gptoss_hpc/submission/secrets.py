"""Secrets travel only through the environment of the submitting shell, never through files.

sbatch exports the submitting environment to the job (its default, --export=ALL), and submitit's local
executor passes it to its processes. So nothing of ours ever writes a secret's value: configs hold none
(validation refuses them in cluster.env), sbatch scripts hold none, pickles hold only a config path.
"""

from __future__ import annotations

import os

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "HF_USER", "SERVE_API_KEY")


def present() -> list[str]:
    """Names (never values) of the secrets the jobs will inherit."""
    return [name for name in SECRET_ENV if os.environ.get(name)]


def values() -> list[str]:
    """The secret values set now: for leak checks (tests, the launcher's own self-check)."""
    return [v for name in SECRET_ENV if (v := os.environ.get(name)) and len(v) >= 8]
