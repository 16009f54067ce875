"""One error hierarchy: the CLI layer turns any of these into a message and a non-zero exit."""

from __future__ import annotations


class GptossHpcError(Exception):
    """Base of every error the package raises on purpose (bad input, failed job, unreachable service)."""


class ConfigError(GptossHpcError):
    """Every problem found in a config, reported at once; each line names the key and the fix."""

    def __init__(self, problems: list[str], header: str = "invalid configuration") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem(s)):\n{lines}")


class DataError(GptossHpcError):
    """Bad data rows or files; the message lists file:row and the reason."""


class SubmissionError(GptossHpcError):
    """sbatch/scheduler failure; the message carries the command's stderr and what did get submitted."""


class ResourceNotReachableError(GptossHpcError):
    """Model, dataset or tokenizer not reachable (offline, gated, wrong name)."""
