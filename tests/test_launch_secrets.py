"""A malformed WANDB_API_KEY is refused at launch, before any sbatch, naming the variable and never its value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.secrets import problems, wandb_key_problem


def test_39_char_wandb_key_is_refused_at_launch_without_printing_it(tmp_path: Path) -> None:
    key = "k3y" * 13  # 39 characters: wandb itself refuses it ("must have 40+ characters")
    run_root = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", "experiment=demo", "cluster=local_slurm", f"run_root={run_root}"],
        capture_output=True, text=True, timeout=120, env={**env, "WANDB_API_KEY": key},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "WANDB_API_KEY" in proc.stderr and "39 characters" in proc.stderr, proc.stderr
    assert key not in proc.stdout + proc.stderr
    assert not run_root.exists() or not list(run_root.rglob("launch.json")), "nothing may be submitted"


@pytest.mark.parametrize(
    "key",
    [
        "a" * 40,
        "a" * 39,
        "a" * 41,
        "local-" + "b" * 40,
        "local-" + "b" * 39,
        "a" * 39 + "!",
        "x" * 20 + " " + "y" * 20,
        "aaa.bbb.ccc",  # JWT shape
        "x-y-" + "z" * 38,
    ],
)
def test_the_key_rule_is_wandbs(key: str) -> None:
    """Same verdict as the installed wandb's own check (so a wandb change that moves the rule shows up here)."""
    from wandb.sdk.lib.wbauth.validation import check_api_key

    assert (wandb_key_problem(key) is None) == (check_api_key(key) is None)


def test_problems_name_the_variable_only_when_set_and_bad() -> None:
    assert problems({}) == [] and problems({"WANDB_API_KEY": "c" * 40}) == []
    (msg,) = problems({"WANDB_API_KEY": "c" * 12})
    assert msg.startswith("WANDB_API_KEY is 12 characters long") and "c" * 12 not in msg
