"""Alias of ``gptoss_hpc.monitor.status``: ``python -m gptoss_hpc.status`` (README, launch output) keeps working."""

from __future__ import annotations

import sys

from gptoss_hpc.monitor.status import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
