"""Alias of ``gptoss_hpc.monitor.cancel``: ``python -m gptoss_hpc.cancel`` (README, launch output) keeps working."""

from __future__ import annotations

import sys

from gptoss_hpc.monitor.cancel import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
