"""The chaos soak: an 8-point sweep of the tiny gpt-oss on the 2-node local Slurm while faults hit it at random
times (a rank SIGKILLed, a node's processes killed, a preemption, a NaN loss, a truncated checkpoint, slurmctld
restarted), then one table that says whether every fault was handled and nothing was lost.

    bash launchers/chaos.sh                        # seed from the clock, printed
    bash launchers/chaos.sh --seed 3               # replay seed 3's schedule
    bash launchers/chaos.sh --seeds 1,2,3,4,5      # one sweep per seed, one summary line each
    bash launchers/chaos.sh --schedule plan.json   # replay a saved schedule (the soak saves each one it runs)

Exit 0 only when every fault was caused and handled, every point ended in its expected state, resumed points
went on at their checkpoint's step + 1, the report was built, no job or process was left and nothing was lost.
The checks read real state only: sacct/squeue (gptoss_hpc.submission.slurm, gptoss_hpc.monitor.state), files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from gptoss_hpc.bench import chaos_faults as faults
from gptoss_hpc.bench.chaos_checks import Outcome, verify
from gptoss_hpc.bench.chaos_plan import KINDS, Fault, Plan, make_plan
from gptoss_hpc.monitor.state import collect
from gptoss_hpc.paths import RunPaths, point_dirname
from gptoss_hpc.stages.divergence import NAN_ENV
from gptoss_hpc.submission import slurm
from gptoss_hpc.submission.manifest import Manifest

# tiny gpt-oss, small BPE tokenizer, one rank per point, `parallel` points at a time spread over both nodes (each
# asks for half a node's share of CPUs), so a node loss hits some points and not others, and with more points
# than `parallel` part of the sweep is pending when the controller restarts
TINY = [
    "experiment=demo",
    "cluster=local_slurm",
    "model.tokenizer=tiny-bpe",
    "train.max_length=256",
    "train.logging_steps=1",
    "cluster.gpus_per_node=1",
    "train.deepspeed=false",
]
SWEEP = [*TINY, "stages=[train,report]"]
NODE_CPUS = 8
SOAK_TIMEOUT_S = 1800


def sweep_args(plan: Plan, run_root: Path) -> list[str]:
    rates = ",".join(f"{(i + 1) * 1e-3:g}" for i in range(plan.points))
    return [
        *SWEEP,
        f"train.max_steps={plan.max_steps}",
        f"train.save_steps={plan.save_steps}",
        f"cluster.array_parallelism={plan.parallel}",
        f"cluster.cpus_per_task={NODE_CPUS // -(-plan.parallel // 2)}",
        f"name=chaos{plan.seed}",
        f"run_root={run_root}",
        "-m",
        f"train.learning_rate={rates}",
    ]


def launch_env(plan: Plan) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_HPC_TEST_")}
    for f in plan.faults:
        if f.kind == "nan":  # <rank>:<step>:<point>: that point of the sweep only
            env[NAN_ENV] = f"0:{f.at_step}:{point_dirname(f.point)}"
    return env


class Soak:
    """Launches the sweep, fires each fault when its trigger is met (each in its own thread: a node loss
    takes a minute to be noticed), and waits until every job of the launch has ended."""

    def __init__(self, plan: Plan, run_root: Path) -> None:
        self.plan, self.run_root = plan, run_root
        self.injections: list[faults.Injection] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.fired: set[int] = set()

    def _fire(self, index: int, fault: Fault, body) -> None:
        self.fired.add(index)

        def run() -> None:
            try:
                done = body()
                done.point = fault.point
                done.affected = done.affected or ([fault.point] if fault.point is not None else [])
                with self.lock:
                    self.injections.append(done)
                print(f"[chaos] {fault.describe()}: {done.detail}", flush=True)
            except (faults.FaultError, subprocess.SubprocessError, OSError, slurm.SlurmError) as exc:
                with self.lock:
                    self.errors.append(f"{fault.describe()}: not caused: {exc}")
                print(f"[chaos] {fault.describe()}: NOT caused: {exc}", flush=True)

        thread = threading.Thread(target=run, name=fault.kind)
        thread.start()
        self.threads.append(thread)

    def _task(self, manifest: Manifest, point: int) -> str:
        return f"{manifest.job('train').job_id}_{point}"

    def _point_fault(self, manifest: Manifest, fault: Fault, tasks: list[str]):
        task = self._task(manifest, fault.point)
        paths = RunPaths(Path(manifest.run_dir)).point(fault.point)
        if fault.kind == "rank_kill":
            return lambda: faults.rank_kill(task)
        if fault.kind == "preempt":
            return lambda: faults.preempt(task)
        if fault.kind == "ckpt_truncate":
            return lambda: faults.ckpt_truncate(task, paths)

        def kill_node() -> faults.Injection:
            done = faults.node_kill(task, tasks)
            done.affected = sorted(int(t.rsplit("_", 1)[1]) for t in done.facts["tasks"])
            return done

        return kill_node

    def run(self) -> tuple[Path, Manifest, float]:
        started = time.time()
        cmd = [sys.executable, "-m", "gptoss_hpc.launch", *sweep_args(self.plan, self.run_root)]
        print(f"[chaos] {' '.join(cmd[1:])}", flush=True)
        launch = subprocess.Popen(
            cmd, env=launch_env(self.plan), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        ctld = [(i, f) for i, f in enumerate(self.plan.faults) if f.kind == "ctld_restart"]
        while launch.poll() is None:  # the controller may go down while the launch submits
            self._ctld_due(ctld, started)
            time.sleep(0.2)
        _, err = launch.communicate()
        if launch.returncode != 0:
            raise faults.FaultError(f"launch exited {launch.returncode}:\n{err[-3000:]}")
        (manifest_path,) = self.run_root.glob("*/*/launch.json")
        manifest = Manifest.load(manifest_path.parent)
        run_dir = Path(manifest.run_dir)
        tasks = [self._task(manifest, p) for p in range(self.plan.points)]
        deadline = time.monotonic() + SOAK_TIMEOUT_S
        while time.monotonic() < deadline:
            self._ctld_due(ctld, started)
            try:
                live = slurm.query([j.job_id for j in manifest.jobs]).states
            except slurm.SlurmError:  # the controller restarting: ask again
                time.sleep(1)
                continue
            for i, fault in enumerate(self.plan.faults):
                if i in self.fired or fault.point is None or fault.kind == "nan":
                    continue
                task = tasks[fault.point]
                running = live.get(task) is not None and live[task].state == "RUNNING"
                if running and self._reached(task, RunPaths(run_dir).point(fault.point).metrics, fault.at_step):
                    self._fire(i, fault, self._point_fault(manifest, fault, tasks))
            if all(not t.is_alive() for t in self.threads) and self._all_ended(run_dir):
                break
            time.sleep(0.5)
        else:
            self.errors.append(f"the sweep did not end within {SOAK_TIMEOUT_S} s")
        for thread in self.threads:
            thread.join(timeout=300)
        for i, fault in enumerate(self.plan.faults):
            if i not in self.fired and fault.kind != "nan":
                self.errors.append(f"{fault.describe()}: never fired (its point ended or never got there)")
        return run_dir, manifest, started

    @staticmethod
    def _reached(task: str, metrics: Path, step: int) -> bool:
        """The task's running rank 0 has itself logged `step` or later (a requeued point's earlier attempt
        logged steps too: those do not count, or a fault would hit the new attempt while it still imports)."""
        pid = faults.rank_pid(task)
        born = faults.started_at(pid) if pid else None
        if born is None or not metrics.is_file():
            return False
        last = None
        for line in metrics.read_text().splitlines()[-5:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "loss" in rec and float(rec.get("time", 0)) > born:
                last = int(rec["step"])
        return last is not None and last >= step

    def _ctld_due(self, ctld: list[tuple[int, Fault]], started: float) -> None:
        for i, fault in ctld:
            if i not in self.fired and time.time() - started >= (fault.after_s or 0):
                self._fire(i, fault, faults.ctld_restart)

    @staticmethod
    def _all_ended(run_dir: Path) -> bool:
        try:
            return collect(run_dir).all_terminal
        except slurm.SlurmError:  # the controller restarting: ask again
            return False


def soak(plan: Plan, work: Path) -> Outcome:
    """One sweep under `plan`'s faults, checked; work/ holds the run, the schedule and the outcome."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "schedule.json").write_text(plan.to_json() + "\n")
    print(f"[chaos] seed {plan.seed}; schedule ({work / 'schedule.json'}):", flush=True)
    for f in plan.faults:
        print(f"[chaos]   {f.describe()}", flush=True)
    faults.cluster("start")  # idempotent: a cluster that cannot start fails the soak here
    runner = Soak(plan, work / "runs")
    run_dir, manifest, started = runner.run()
    outcome = verify(plan, run_dir, manifest, runner.injections, runner.errors, since=started)
    (work / "outcome.json").write_text(json.dumps(outcome.to_dict(), indent=1) + "\n")
    return outcome


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/chaos.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="the schedule's seed (default: from the clock, printed)")
    p.add_argument("--seeds", help="comma-separated seeds: one sweep each, then one line per seed")
    p.add_argument("--schedule", type=Path, help="replay this schedule.json instead of drawing one")
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=5)
    p.add_argument("--parallel", type=int, default=4, help="points training at once (the rest wait)")
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"fault kinds to inject (default: all of {','.join(KINDS)})"
    )
    p.add_argument("--work", type=Path, default=Path("logs/chaos"), help="where runs, schedules and outcomes go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if args.schedule:
        plans = [Plan.load(args.schedule)]
    else:
        seeds = (
            [int(s) for s in args.seeds.split(",")]
            if args.seeds
            else [args.seed if args.seed is not None else int(time.time()) % 100000]
        )
        plans = [
            make_plan(
                s,
                points=args.points,
                max_steps=args.max_steps,
                save_steps=args.save_steps,
                parallel=args.parallel,
                kinds=kinds,
            )
            for s in seeds
        ]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    outcomes = []
    for plan in plans:
        outcome = soak(plan, args.work / f"{stamp}-seed{plan.seed}")
        print(outcome.table(), flush=True)
        outcomes.append(outcome)
    if len(outcomes) > 1:
        print(Outcome.summary(outcomes), flush=True)
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
