"""`python -m gptoss_hpc.bench train` on the CPU with the tiny gpt-oss: the bench's own code path (model build,
LoRA, synthetic batches, speed knobs, timed steps, --check) runs end to end, and the knobs' loss and LoRA
gradients equal the stock path's in fp32. The GPU numbers live in docs/BENCHMARKS.md; here only the GPU is
faked away (device=cpu, a 4k vocab) and nothing is timed or asserted about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_train_runs_on_cpu_and_its_knobs_keep_the_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.bench", "train", "model=tiny_gpt_oss", "model.tokenizer=tiny-bpe",
         "train.max_length=128", "lora.expert_layers=[1]", "--device", "cpu", "--vocab", "4096",
         "--steps", "1", "--warmup", "1", "--no-peak", "--check", "--check-tokens", "128", "--check-layers", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    timed = [r for r in rows if r["name"].startswith("configured")]
    assert timed and timed[0]["status"] == "ok" and timed[0]["tok_s"] > 0 and timed[0]["tokens_per_step"] > 0
    (check,) = [r for r in rows if r["name"] == "check fast vs stock"]
    assert check["status"] == "ok"
    fp32 = check["float32"]
    assert fp32["no_grad_prefix"]["knobs"]["no_grad_layers"] == 1  # LoRA on layer 1 only: layer 0 frozen
    for knob in ("chunked_ce", "no_grad_prefix", "all (configured)"):
        assert fp32[knob]["loss_rel_err"] < 1e-5, (knob, fp32[knob])
        assert fp32[knob]["grad_rel_err"] < 1e-4, (knob, fp32[knob])
