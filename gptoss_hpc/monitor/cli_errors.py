"""How the watching CLIs (status, logs, cancel) end on an error: one line on stderr and an exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.monitor.state import LaunchNotFoundError


def cli_exit_status(exc: GptossHpcError) -> int:
    """The exit status of status / logs / cancel for an error: 2 when no launch matches what was asked, else 1."""
    return 2 if isinstance(exc, LaunchNotFoundError) else 1


def run_cli(body: Callable[[], int]) -> int:
    """A watching CLI's body: an error is one line + cli_exit_status, Ctrl-C 130, a closed pipe (| head) 0."""
    try:
        return body()
    except GptossHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli_exit_status(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
