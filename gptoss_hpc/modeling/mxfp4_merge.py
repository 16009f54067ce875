"""``python -m gptoss_hpc.modeling.mxfp4_merge``: the command's old name (README and docs/BENCHMARKS.md ran it so);
the merge lives in gptoss_hpc.modeling.mxfp4.merge."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from gptoss_hpc.modeling.mxfp4.merge import main

    sys.exit(main())
