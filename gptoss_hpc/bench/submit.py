"""Submission benchmark: compose, validate and submit an N-point sweep to the local Slurm, held.

    bash launchers/local_slurm.sh start && export SLURM_CONF=...
    python -m gptoss_hpc.bench submit --points 64

Every job is submitted with --hold and cancelled afterwards: nothing trains. The launcher runs as a
subprocess exactly as a user runs it; an `sbatch` shim first on PATH counts the real sbatch calls.
Target (issue 3): < 5 s wall time and <= 4 sbatch calls for 64 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptoss_hpc.submission.manifest import Manifest


def sweep_overrides(points: int) -> list[str]:
    """lora.r x train.learning_rate values whose product is `points` (64 -> 8 x 8)."""
    ranks = max(d for d in range(1, math.isqrt(points) + 1) if points % d == 0)
    rates = points // ranks
    r_values = ",".join(str(4 * (i + 1)) for i in range(ranks))
    lr_values = ",".join(f"{(i + 1) * 1e-5:.0e}" for i in range(rates))
    return [f"lora.r={r_values}", f"train.learning_rate={lr_values}"]


def _sbatch_shim(folder: Path, counter: Path) -> Path:
    real = shutil.which("sbatch")
    if real is None:
        raise SystemExit("sbatch not found: start the local Slurm (bash launchers/local_slurm.sh start)")
    shim = folder / "sbatch"
    shim.write_text(f'#!/bin/sh\necho x >> "{counter}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench submit", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (default: experiment=demo on local_slurm)")
    args = parser.parse_args(argv)
    if "SLURM_CONF" not in os.environ:
        print("SLURM_CONF is not set: run `bash launchers/local_slurm.sh start` and export it", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="gptoss-bench-submit-") as tmp:
        tmp_path = Path(tmp)
        counter = tmp_path / "sbatch_calls"
        shim_dir = _sbatch_shim(tmp_path, counter)
        run_root = tmp_path / "logs"
        cmd = [
            sys.executable, "-m", "gptoss_hpc.launch", "-m",
            "experiment=demo", "cluster=local_slurm", "name=benchsubmit", f"run_root={run_root}",
            "+cluster.sbatch_extra.hold=", *sweep_overrides(args.points), *args.overrides,
        ]  # fmt: skip
        env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        manifests = list(run_root.glob("benchsubmit/*/launch.json"))
        manifest = Manifest.load(manifests[0].parent)
        job_ids = [j.job_id for j in manifest.jobs]
        sbatch_calls = len(counter.read_text().split()) if counter.exists() else 0
        subprocess.run(["scancel", *job_ids], check=True, capture_output=True, text=True)

    result = {
        "points": len(manifest.points),
        "wall_s": round(wall, 3),
        "sbatch_calls": sbatch_calls,
        "jobs": {j.stage: j.job_id for j in manifest.jobs},
        "array_tasks": {j.stage: len(j.points) for j in manifest.jobs if j.array},
        "target": "< 5 s and <= 4 sbatch calls",
        "met": wall < 5 and sbatch_calls <= 4,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
