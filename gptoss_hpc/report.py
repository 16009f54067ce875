"""Alias of ``gptoss_hpc.stages.report`` so that ``python -m gptoss_hpc.report RUN_DIR`` keeps working.

python -m gptoss_hpc.report logs/demo/20261125-081500
"""

from __future__ import annotations

from gptoss_hpc.stages.report import cli

__all__ = ["cli"]

if __name__ == "__main__":
    raise SystemExit(cli())
