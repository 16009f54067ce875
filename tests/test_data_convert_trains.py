"""A <think>-tag reasoning file, converted by `python -m gptoss_hpc.data convert`, trains through the real
SFT stage (tiny gpt-oss, small BPE tokenizer, TRL + PEFT on CPU). Nothing faked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config, validate
from gptoss_hpc.paths import PointPaths

pytestmark = pytest.mark.slow


def test_converted_think_tag_file_trains(tmp_path: Path) -> None:
    rows = [
        {"question": f"{a} + {b} は？", "answer": f"<think>{a} に {b} を足すと {a + b}。</think>答えは {a + b} です。"}
        for a, b in zip(range(1, 13), range(3, 15), strict=True)
    ]
    rows.append({"question": "空の答え", "answer": ""})
    src = tmp_path / "ja_reasoning.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.data", "convert", "--format", "think-tags", str(src), str(out),
         "--language", "Japanese"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"rows out:\s+12\b", proc.stdout), proc.stdout
    assert re.search(r"empty answers:\s+1\b", proc.stdout), proc.stdout

    from gptoss_hpc.stages.train import main

    cfg = validate(
        to_run_config(
            compose(["experiment=demo", "model.tokenizer=tiny-bpe", "data=local", f"data.path={out}/ja_reasoning.jsonl",
                     "train.max_steps=2", "train.save_steps=2"])
        )
    )  # fmt: skip
    config = save_run_config(cfg, tmp_path / "run" / "p000" / "config.yaml")
    metrics = main(str(config))
    assert metrics["global_step"] == 2 and metrics["train_rows"] >= 10
    assert (PointPaths.from_config(config).adapter / "adapter_model.safetensors").is_file()
