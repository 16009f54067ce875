"""Alias of ``gptoss_hpc.stages.serve``: ``python -m gptoss_hpc.serve MODEL_OR_CONFIG`` (README) keeps working.

python -m gptoss_hpc.serve logs/demo/20261125-081500/p000/merged --port 8000
"""

from __future__ import annotations

from gptoss_hpc.stages.serve import cli

__all__ = ["cli"]

if __name__ == "__main__":
    raise SystemExit(cli())
