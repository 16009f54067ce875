#!/usr/bin/env bash
# The chaos soak (gptoss_hpc/bench/chaos.py): an 8-point tiny gpt-oss sweep on the 2-node local Slurm while a
# rank is SIGKILLed, a node's processes are killed, a point is preempted, a loss turns NaN, a checkpoint is cut
# and slurmctld restarts; prints one table and exits non-zero unless every fault was handled and nothing lost.
#
#   bash launchers/chaos.sh                     # one sweep, seed from the clock (printed)
#   bash launchers/chaos.sh --seed 3            # replay seed 3
#   bash launchers/chaos.sh --seeds 1,2,3,4,5   # five sweeps, then one summary line per seed
#   bash launchers/chaos.sh --schedule logs/chaos/<stamp>-seed3/schedule.json
#
# Runs as root (the 2-node cluster: network namespaces). Starts the cluster if it is down
# (launchers/local_slurm.sh start --nodes 2). Never touches the one-node cluster.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
eval "$(bash launchers/local_slurm.sh start --nodes 2)"
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m gptoss_hpc.bench.chaos "$@"
