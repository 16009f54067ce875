"""gptoss-hpc: one entry point for launching and watching LoRA fine-tuning runs of gpt-oss on Slurm.

examples:
  gptoss-hpc launch cluster=local_slurm -m lora.r=8,16     # submit a sweep (see gptoss_hpc.launch)
  gptoss-hpc status                                        # newest launch under logs/: every job
  gptoss-hpc status demo --watch 5                         # newest launch of "demo", refreshed
  gptoss-hpc status logs/demo/20261125-081500 --json       # for scripts
  gptoss-hpc logs logs/demo/20261125-081500 --point 2 -f   # follow point 2's training log
  gptoss-hpc logs 1234_2 --err                             # stderr of array task 2 of job 1234
  gptoss-hpc cancel demo                                   # cancel every job of that launch, only those
  gptoss-hpc report logs/demo/20261125-081500              # (re)build the run's report

`gptoss-hpc <command> --help` shows each command's options.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "launch": ("gptoss_hpc.launch", "submit a run or sweep (Hydra overrides)"),
    "status": ("gptoss_hpc.monitor.status", "table of every job of a launch"),
    "logs": ("gptoss_hpc.monitor.logs", "print or follow a job's log"),
    "cancel": ("gptoss_hpc.monitor.cancel", "cancel every job of a launch"),
    "report": ("gptoss_hpc.stages.report", "build a run's report"),
}


ENTRY_POINTS = ("cli", "main")  # stages.report: cli(argv) is the CLI, main(run_dir) the job body


def _usage() -> str:
    lines = ["usage: gptoss-hpc {" + ",".join(COMMANDS) + "} [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines) + "\n\n" + __doc__.split("\n\n", 1)[1]


def _takes_argv(fn: object) -> bool:
    try:
        return bool(inspect.signature(fn).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(
            f"error: `gptoss-hpc {name}` is not available in this install ({module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    entry = next((getattr(module, a) for a in ENTRY_POINTS if callable(getattr(module, a, None))), None)
    if entry is None:
        print(f"error: `gptoss-hpc {name}` is not available ({module_name} has no main())", file=sys.stderr)
        return 2
    sys.argv = [f"gptoss-hpc {name}", *rest]  # for mains that parse sys.argv themselves (Hydra)
    try:
        code = entry(rest) if _takes_argv(entry) else entry()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gptoss-hpc ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # GptossHpcError from modules that do not catch their own
        from gptoss_hpc.errors import GptossHpcError

        if isinstance(exc, GptossHpcError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
