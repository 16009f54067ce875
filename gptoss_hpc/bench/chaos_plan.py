"""The chaos soak's fault schedule: which fault hits which sweep point, and when, drawn from one seed.

A schedule is plain JSON (``--schedule FILE`` replays one; the soak prints and saves the one it ran):

    {"seed": 3, "points": 8, "max_steps": 60, "save_steps": 5, "parallel": 4,
     "faults": [{"kind": "rank_kill", "point": 5, "at_step": 9}, {"kind": "ctld_restart", "after_s": 21.4}, ...]}

A point fault fires once its point has logged ``at_step`` (and its job runs); ``ctld_restart`` fires
``after_s`` seconds after the launch command started (so it may land while the launch is still submitting).
Every point fault has its own point, so each point's expected end is known: FAILED where a rank was killed
or the loss became NaN, COMPLETED everywhere else (preempted, node-killed and truncated points resume).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptoss_hpc.errors import GptossHpcError

# rank_kill: SIGKILL to rank 0 of a point's job; node_kill: every process of the node a point runs on;
# preempt: the preempt signal (USR2) to a point's job; nan: its loss made NaN at a step (test hook);
# ckpt_truncate: the job stopped and requeued, its newest checkpoint cut to half meanwhile;
# ctld_restart: slurmctld stopped and started again from its saved state.
KINDS = ("rank_kill", "node_kill", "preempt", "nan", "ckpt_truncate", "ctld_restart")
POINT_KINDS = tuple(k for k in KINDS if k != "ctld_restart")
# the kinds that end their point FAILED (a crash is not retried; a diverged run must stop)
FAILING_KINDS = frozenset({"rank_kill", "nan"})


class PlanError(GptossHpcError):
    """A schedule that cannot run: unknown kind, two faults on one point, a step past max_steps."""


@dataclass
class Fault:
    kind: str
    point: int | None = None  # None for ctld_restart
    at_step: int | None = None  # point faults: fire once the point logged this step
    after_s: float | None = None  # ctld_restart: seconds after the launch started

    def describe(self) -> str:
        if self.point is None:
            return f"{self.kind} at +{self.after_s:.0f} s"
        return f"{self.kind} p{self.point:03d} at step {self.at_step}"


@dataclass
class Plan:
    seed: int
    points: int = 8
    max_steps: int = 60
    save_steps: int = 5
    parallel: int = 4  # points training at once (cluster.array_parallelism); the rest wait, PENDING
    faults: list[Fault] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            raw = json.loads(path.read_text())
            plan = cls(**{k: v for k, v in raw.items() if k != "faults"})
            plan.faults = [Fault(**f) for f in raw.get("faults", [])]
        except (OSError, ValueError, TypeError) as exc:
            raise PlanError(f"{path}: not a chaos schedule ({exc}); write one with --save-schedule") from exc
        plan.check()
        return plan

    def for_point(self, point: int) -> list[Fault]:
        return [f for f in self.faults if f.point == point]

    def check(self) -> None:
        problems = []
        for f in self.faults:
            if f.kind not in KINDS:
                problems.append(f"fault kind {f.kind!r} is unknown; choose from {list(KINDS)}")
            elif f.kind == "ctld_restart":
                if f.after_s is None or f.after_s < 0:
                    problems.append(f"{f.kind} needs after_s >= 0 (got {f.after_s})")
            elif f.point is None or not 0 <= f.point < self.points:
                problems.append(f"{f.kind} needs a point in 0..{self.points - 1} (got {f.point})")
            elif f.at_step is None or not 1 <= f.at_step < self.max_steps:
                problems.append(f"{f.kind} p{f.point} needs 1 <= at_step < max_steps={self.max_steps}")
        if not 1 <= self.parallel <= 8:
            problems.append(f"parallel must be 1..8 (got {self.parallel}): the 2 nodes have 8 CPUs each")
        targets = [f.point for f in self.faults if f.point is not None]
        if len(targets) != len(set(targets)):
            problems.append(f"two point faults share a point ({sorted(targets)}): each needs its own")
        if problems:
            raise PlanError("chaos schedule: " + "; ".join(problems))


def make_plan(
    seed: int,
    *,
    points: int = 8,
    max_steps: int = 60,
    save_steps: int = 5,
    parallel: int = 4,
    kinds: tuple[str, ...] = KINDS,
) -> Plan:
    """A random schedule: each point kind on its own random point, at a random step; the controller
    restart at a random time in the first minute (during the launch, or while points train or wait)."""
    rng = random.Random(seed)
    point_kinds = [k for k in kinds if k in POINT_KINDS]
    if len(point_kinds) > points:
        raise PlanError(f"{len(point_kinds)} point faults need >= {len(point_kinds)} points (got {points})")
    targets = rng.sample(range(points), len(point_kinds))
    late = min(max_steps - save_steps - 2, max_steps * 3 // 5)  # well before the point can finish
    first = {  # the earliest step a fault means something at
        "rank_kill": 3,
        "node_kill": save_steps + 1,  # a checkpoint to resume from
        "preempt": 3,
        "nan": save_steps + 1,  # a last good checkpoint before it
        "ckpt_truncate": 2 * save_steps + 1,  # two checkpoints: the newest is cut, the one before it loads
    }
    faults = [
        Fault(k, point=p, at_step=rng.randint(first[k], max(first[k], late)))
        for k, p in zip(point_kinds, targets, strict=True)
    ]
    if "ctld_restart" in kinds:
        faults.append(Fault("ctld_restart", after_s=round(rng.uniform(3, 60), 1)))
    plan = Plan(seed, points, max_steps, save_steps, parallel, faults)
    plan.check()
    return plan
