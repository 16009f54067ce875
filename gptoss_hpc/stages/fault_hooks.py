"""Which sweep points the test-only fault hooks (GPTOSS_HPC_TEST_RAISE_AT, GPTOSS_HPC_TEST_NAN_AT) apply to.

One launch's environment reaches every array task of its sweep, so a hook set for it would fire in every
point; ``GPTOSS_HPC_TEST_FAULT_POINTS=3`` (or ``3,5``) keeps it to those points, as the chaos soak
(gptoss_hpc/bench/chaos.py) needs to fault one point of eight. Unset: every point. A real user sets neither.
"""

from __future__ import annotations

import os

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import POINT_PREFIX, PointPaths

POINTS_ENV = "GPTOSS_HPC_TEST_FAULT_POINTS"


def hook_spec(name: str, paths: PointPaths) -> str | None:
    """The value of the hook variable `name`, or None when it is unset or this point is not in
    GPTOSS_HPC_TEST_FAULT_POINTS."""
    spec = os.environ.get(name)
    points = os.environ.get(POINTS_ENV, "").strip()
    if not spec or not points:
        return spec or None
    try:
        wanted = {int(p) for p in points.split(",") if p.strip()}
    except ValueError as exc:
        raise GptossHpcError(f"{POINTS_ENV}={points!r} is not point indices like 3 or 3,5; unset it") from exc
    here = paths.root.name.removeprefix(POINT_PREFIX)
    return spec if here.isdigit() and int(here) in wanted else None
