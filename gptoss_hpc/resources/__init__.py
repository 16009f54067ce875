"""Files shipped with the package: tiny model configs."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent


def tiny_config_path(name: str) -> Path:
    return RESOURCES / f"{name}.json"
