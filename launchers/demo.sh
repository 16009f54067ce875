#!/usr/bin/env bash
# `make demo` for people without make: install into .venv if needed, then run the tiny CPU demo
# (tiny gpt-oss, bundled sample data, every stage as local processes; no GPU, no Slurm, no Hub).
#
#   bash launchers/demo.sh                      # same as: make demo
#   bash launchers/demo.sh train.max_steps=4    # extra Hydra overrides are passed through
#
# The install is skipped when .venv/.gptoss_hpc-installed is newer than pyproject.toml (the same stamp
# file as the Makefile). torch==2.13.0 must be in the SAME pip command: alone, trl would pull a
# multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
STAMP=.venv/.gptoss_hpc-installed
if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]]; then
    [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
    .venv/bin/pip install torch==2.13.0 -e '.[dev]'
    touch "$STAMP"
fi
exec .venv/bin/python -m gptoss_hpc.launch experiment=demo "$@"
