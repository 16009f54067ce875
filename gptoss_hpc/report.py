"""Sweep report of a launch: table, loss curves, eval against lora.r / learning_rate, failed points.

    python -m gptoss_hpc.report logs/demo/20261125-081500

Writes RUN_DIR/report/report.md, report.json and PNG plots; exits 1 only when no point has any result.
The work is done by gptoss_hpc.stages.report (also the report job's body).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def cli(argv: Sequence[str] | None = None) -> int:
    from gptoss_hpc.errors import GptossHpcError
    from gptoss_hpc.stages.report import main

    parser = argparse.ArgumentParser(prog="python -m gptoss_hpc.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a launch directory (holds launch.json)")
    args = parser.parse_args(argv)
    try:
        path = main(args.run_dir)
    except GptossHpcError as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
