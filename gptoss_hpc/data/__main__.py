"""python -m gptoss_hpc.data {convert,validate,stats} --help"""

from __future__ import annotations

import sys

from gptoss_hpc.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
