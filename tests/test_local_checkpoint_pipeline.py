"""`experiment=demo model=local model.name_or_path=<synthetic tiny gpt-oss>`: train -> merge -> eval -> report
through transformers' real MXFP4 loading path, as local processes (no GPU, no Slurm, no Hub).

Real: the Hub-layout checkpoint from gptoss_hpc.synth_checkpoint, from_pretrained + Mxfp4Config(dequantize=True),
the tokenizer and chat template read from that folder, TRL + PEFT, merge with its logits check, eval, report.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from gptoss_hpc.config import load_run_config, save_run_config
from gptoss_hpc.paths import PointPaths, RunPaths
from gptoss_hpc.submission.manifest import Manifest

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("local_ckpt")
    ckpt = root / "gpt-oss-tiny"
    subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.synth_checkpoint", "--size", "tiny", str(ckpt)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptoss_hpc.launch",
            "experiment=demo",
            "model=local",
            f"model.name_or_path={ckpt}",
            f"run_root={root}/logs",
        ],
        capture_output=True,
        text=True,
        timeout=850,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (manifest_path,) = (root / "logs").glob("demo/*/launch.json")
    return ckpt, manifest_path.parent


def test_every_stage_runs_from_the_local_folder(launched: tuple[Path, Path]) -> None:
    ckpt, run_dir = launched
    manifest = Manifest.load(run_dir)
    assert [j.stage for j in manifest.jobs] == ["train", "merge", "eval", "report"]
    point = RunPaths(run_dir).point(0)
    cfg = load_run_config(point.config)
    assert (cfg.model.name_or_path, cfg.model.tiny, cfg.model.num_hidden_layers) == (str(ckpt), False, 2)
    assert not point.base.exists()  # nothing was built: the base came from the folder
    for stage in ("train", "merge", "eval"):
        status = json.loads(point.stage_status(stage).read_text())
        assert status["state"] == "COMPLETED", status
        assert status["wall_s"] > 0 and status["peak_gpu_gib"] is None, status  # CPU: no GPU figure
    losses = [json.loads(line)["loss"] for line in point.metrics.read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    check = json.loads((point.merged / "merge_check.json").read_text())
    assert check["passed"] and check["adapted_parameters"] > 0
    merged_config = json.loads((point.merged / "config.json").read_text())
    assert "quantization_config" not in merged_config  # dequantized weights, saved plainly
    assert list(point.merged.glob("*.safetensors"))
    result = json.loads((point.eval / "eval.json").read_text())
    assert result["base"]["loss"] is not None and result["finetuned"]["loss"] is not None
    assert (RunPaths(run_dir).report / "report.md").is_file()


def test_eval_never_holds_base_and_merged_together(
    launched: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base model is garbage by the time the merged one loads (one 20b model per card at a time)."""
    from gptoss_hpc.stages import eval as eval_stage

    _, run_dir = launched
    src = RunPaths(run_dir).point(0)
    paths = PointPaths(tmp_path / "p000")
    shutil.copytree(src.merged, paths.merged)
    cfg = load_run_config(src.config)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=2, max_eval_rows=1))
    save_run_config(cfg, paths.config)

    alive: list[weakref.ref] = []
    seen_at_merged_load: list[bool] = []
    load_base, load_merged = eval_stage.load_base, eval_stage.load_merged

    def tracked_base(*args):
        model = load_base(*args)
        alive.append(weakref.ref(model))
        return model

    def tracked_merged(*args):
        gc.collect()
        seen_at_merged_load.append(alive[0]() is not None)
        return load_merged(*args)

    monkeypatch.setattr(eval_stage, "load_base", tracked_base)
    monkeypatch.setattr(eval_stage, "load_merged", tracked_merged)
    eval_stage.main(paths.config)
    assert seen_at_merged_load == [False]
    status = json.loads(paths.stage_status("eval").read_text())
    assert status["state"] == "COMPLETED" and status["wall_s"] > 0


@pytest.mark.slurm
def test_local_folder_through_the_local_slurm_with_two_ranks(launched: tuple[Path, Path], tmp_path: Path) -> None:
    """The same folder on the real local Slurm: two ranks each load it (DeepSpeed/gloo), then merge and eval."""
    import os
    import time

    ckpt, _ = launched
    args = [
        "experiment=demo",
        "cluster=local_slurm",
        "model=local",
        f"model.name_or_path={ckpt}",
        "train.max_steps=2",
        "train.max_length=256",
        "eval.max_new_tokens=4",
        "eval.max_eval_rows=2",
        f"run_root={tmp_path}/logs",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PUSH_TO_HUB": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *args], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (manifest_path,) = (tmp_path / "logs").glob("demo/*/launch.json")
    manifest = Manifest.load(manifest_path.parent)
    point = RunPaths(manifest_path.parent).point(0)
    deadline = time.time() + 800
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = {}
        for stage in ("train", "merge", "eval"):
            status = point.stage_status(stage)
            states[stage] = json.loads(status.read_text())["state"] if status.is_file() else "PENDING"
        if "FAILED" in states.values() or all(s == "COMPLETED" for s in states.values()):
            break
        time.sleep(5)
    else:
        subprocess.run(["scancel", *[j.job_id for j in manifest.jobs]], check=False)
    assert states == {"train": "COMPLETED", "merge": "COMPLETED", "eval": "COMPLETED"}, states
    train_cfg = load_run_config(point.config)
    assert train_cfg.cluster.gpus_per_node == 2 and not train_cfg.model.tiny
    assert json.loads((point.merged / "merge_check.json").read_text())["passed"]
