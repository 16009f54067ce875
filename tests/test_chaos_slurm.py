"""The chaos soak (gptoss_hpc/bench/chaos.py, `bash launchers/chaos.sh`) in its bounded CI form, on the REAL 2-node
local Slurm: one seed, a 5-point sweep of the tiny gpt-oss (all five at once), all six fault kinds (a rank
SIGKILLed, a node's processes killed, a preemption, a NaN loss, a truncated checkpoint, slurmctld restarted).
~3 min here. The full soak (8 points, 5 seeds) is in docs/BENCHMARKS.md, "Reliability".

Real: slurmctld/slurmd/slurmdbd, the launcher, TRL training on the CPU, every fault (signals, the node's
processes, the file cut, the controller restart). Faked: the GPUs (gres on character devices), and the NaN,
which the test-only hook GPTOSS_HPC_TEST_NAN_AT puts into a real training step's loss.

    .venv/bin/python -m pytest -q tests/test_chaos_slurm.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_hpc.bench.chaos import soak
from gptoss_hpc.bench.chaos_plan import KINDS, Plan, PlanError, make_plan

pytestmark = [pytest.mark.slurm2, pytest.mark.slow, pytest.mark.timeout(900)]

SEED = 11


def test_bounded_chaos_soak_handles_every_fault_and_loses_nothing(tmp_path: Path) -> None:
    plan = make_plan(SEED, points=5, max_steps=50, save_steps=5, parallel=5)
    assert {f.kind for f in plan.faults} == set(KINDS)
    outcome = soak(plan, tmp_path)
    print(outcome.table())
    assert outcome.passed, outcome.table()
    # what the table says is what was saved for a replay
    saved = json.loads((tmp_path / "outcome.json").read_text())
    assert saved["passed"] and len(saved["faults"]) == len(KINDS)
    assert Plan.load(tmp_path / "schedule.json") == plan


def test_a_schedule_names_every_fault_and_refuses_two_on_one_point(tmp_path: Path) -> None:
    plan = make_plan(3)
    assert plan == make_plan(3) and plan != make_plan(4)  # the seed alone replays it
    points = [f.point for f in plan.faults if f.point is not None]
    assert len(points) == len(set(points)) == len(KINDS) - 1
    path = tmp_path / "s.json"
    plan.faults[1].point = plan.faults[0].point
    path.write_text(plan.to_json())
    with pytest.raises(PlanError, match="two point faults share a point"):
        Plan.load(path)
