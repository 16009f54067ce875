"""The README's main job, `python -m gptoss_hpc.launch experiment=demo`, end to end on the local backend.

Real: tiny gpt-oss, the real gpt-oss tokenizer built offline from bpe-openai, the bundled sample, TRL +
PEFT training, merge, eval and report as local processes through submitit. Nothing is faked; no Slurm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.paths import RunPaths
from gptoss_hpc.submission.manifest import Manifest

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_locally(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", "experiment=demo", f"run_root={tmp_path}/logs"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (manifest_path,) = (tmp_path / "logs").glob("demo/*/launch.json")
    manifest = Manifest.load(manifest_path.parent)
    assert manifest.backend == "local"
    assert [j.stage for j in manifest.jobs] == ["train", "merge", "eval", "report"]
    point = RunPaths(manifest_path.parent).point(0)
    for stage in ("train", "merge", "eval"):
        assert json.loads(point.stage_status(stage).read_text())["state"] == "COMPLETED"
    losses = [json.loads(line)["loss"] for line in point.metrics.read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    # The embedded default must use the real gpt-oss tokenizer (201,088 tokens), not the small test BPE.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(point.adapter)
    assert len(tokenizer) == 201_088
    assert tokenizer.convert_tokens_to_ids(["<|start|>", "<|channel|>", "<|return|>"]) == [200006, 200005, 200002]
    assert (RunPaths(manifest_path.parent).report / "report.md").is_file()
