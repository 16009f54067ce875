# gptoss_hpc entry points (GNU make):
#   make demo   install into .venv if needed, then run the tiny CPU demo: every stage, no GPU/Slurm/Hub
#   make test   install into .venv if needed, start the local one-node Slurm, run the whole test suite
#   make lint   ruff check + ruff format --check
# The install is a stamp file: it reruns only when pyproject.toml changes (or .venv is deleted).
# torch==2.13.0 must be in the SAME pip command as the package: alone, trl would pull a multi-GB CUDA
# torch (docs: /work/shared/FACTS.md, "The CPU machine").

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.gptoss_hpc-installed
# extra Hydra overrides for the demo, e.g. make demo DEMO_ARGS="train.max_steps=4"
DEMO_ARGS ?=
# Two pytest-xdist workers: the suite waits on Slurm (scheduling, requeue holds, sacct) and on single-threaded
# imports a good part of the time, which a second worker fills. tests/conftest.py keeps each local cluster's
# tests on one worker, in order. `make test PYTEST_ARGS=` runs it serially. The 25 slowest tests go to the log.
PYTEST_ARGS ?= -n 2 --dist loadgroup --no-loadscope-reorder --durations=25

.PHONY: demo test lint

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0 -e '.[dev]'
	@touch $@

# Triton for its CPU interpreter only: tests/test_mxfp4_triton.py runs the GPU's MXFP4 dequant kernel under
# TRITON_INTERPRET=1. In its own folder, outside the venv's site-packages, so that torch on CPU never sees it.
TRITON_DIR := $(VENV)/triton-interpreter
TRITON_STAMP := $(TRITON_DIR)/.installed

$(TRITON_STAMP): | $(STAMP)
	$(VENV)/bin/pip install -q --no-deps --target $(TRITON_DIR) triton==3.5.1
	@touch $@

demo: $(STAMP)
	$(VPY) -m gptoss_hpc.launch experiment=demo $(DEMO_ARGS)

# local_slurm.sh prints `export SLURM_CONF=...` as its last stdout line (chatter goes to stderr).
# pytest exit 5 = no tests collected: a failure here, never a silent pass.
test: $(STAMP) $(TRITON_STAMP)
	@export_line="$$(bash launchers/local_slurm.sh start | tail -n 1)"; \
	eval "$$export_line"; \
	test -f "$${SLURM_CONF:-}" || { echo "make test: local_slurm.sh start printed no SLURM_CONF" >&2; exit 1; }; \
	echo "SLURM_CONF=$$SLURM_CONF"; \
	rc=0; $(VPY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit "$$rc"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
