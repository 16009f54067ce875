"""Problems the running stage survived (W&B down, a Hub push refused), at the bottom layer so that any layer can
report one: each is logged, and ``stages.common.run_stage`` keeps them in status/<stage>.json's "warnings", where
`status` and the report show them."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_WARNINGS: list[str] = []


def stage_warning(message: str) -> None:
    """Record a non-fatal problem of the running stage (rank 0's shows in status and the report)."""
    log.warning("%s", message)
    _WARNINGS.append(message)


def collected() -> list[str]:
    """The warnings recorded since the last ``clear()``, oldest first (a copy)."""
    return list(_WARNINGS)


def clear() -> None:
    """Start a stage with none (run_stage calls it)."""
    _WARNINGS.clear()
