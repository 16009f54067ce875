"""Which sweep points the test-only fault hooks (GPTOSS_HPC_TEST_RAISE_AT, GPTOSS_HPC_TEST_NAN_AT) apply to.

One launch's environment reaches every array task of its sweep, so a hook set for it would fire in every
point; ``GPTOSS_HPC_TEST_FAULT_POINTS=3`` (or ``3,5``) keeps the hooks to those points, as the chaos soak
(gptoss_hpc/bench/chaos.py) needs to fault one point of eight. Unset: every point. A real user sets none of them.
"""

from __future__ import annotations

import logging
import os

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.paths import POINT_PREFIX, PointPaths

log = logging.getLogger(__name__)

POINTS_ENV = "GPTOSS_HPC_TEST_FAULT_POINTS"
HOOK_ENVS = ("GPTOSS_HPC_TEST_RAISE_AT", "GPTOSS_HPC_TEST_NAN_AT")


def keep_hooks_to_their_points(paths: PointPaths) -> None:
    """Unset the hook variables in this process when GPTOSS_HPC_TEST_FAULT_POINTS leaves this point out, so
    the hooks, which read them later, never fire here."""
    points = os.environ.get(POINTS_ENV, "").strip()
    if not points:
        return
    try:
        wanted = {int(p) for p in points.split(",") if p.strip()}
    except ValueError as exc:
        raise GptossHpcError(f"{POINTS_ENV}={points!r} is not point indices like 3 or 3,5; unset it") from exc
    here = paths.root.name.removeprefix(POINT_PREFIX)
    if here.isdigit() and int(here) in wanted:
        return
    for name in HOOK_ENVS:
        if os.environ.pop(name, None) is not None:
            log.info("%s is not for %s (%s=%s): unset", name, paths.root.name, POINTS_ENV, points)
