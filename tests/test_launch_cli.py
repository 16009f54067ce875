"""The launcher's CLI without a scheduler: dry runs, rejected input, the golden sbatch text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import conf_dir
from gptoss_hpc.errors import ConfigError
from gptoss_hpc.submission import pipeline

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


def launch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.launch", *args, "run_root=" + str(cwd / "logs")],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "GPTOSS_HPC_CONF": str(conf_dir()), **(env or {})},
        timeout=120,
    )


def test_dry_run_coreweave_prints_the_sbatch_and_submits_nothing(tmp_path: Path) -> None:
    # An sbatch that records any call: the dry run must never reach it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "sbatch-called"
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    result = launch("cluster=coreweave_h200", "lora.r=8", "dry_run=true", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    train = out.split("# ===== sbatch: train")[1].split("# ===== sbatch: merge")[0]
    assert "#SBATCH --partition=h200-low" in train
    assert "#SBATCH --gpus-per-node=8" in train
    assert "#SBATCH --ntasks-per-node=8" in train
    assert "#SBATCH --time=720" in train  # 12:00:00
    assert "python -m gptoss_hpc.stages.train" in train
    assert "submitit.core._submit" in train
    assert "r: 8" in out  # the resolved config is printed too
    assert not marker.exists()
    assert not (tmp_path / "logs").exists(), "a dry run must not create a run dir"


def test_all_bad_values_in_one_message(tmp_path: Path) -> None:
    result = launch(
        "lora.r=0", "train.learning_rate=-1", "cluster=coreweave_h200", "cluster.gpus_per_node=0", "dry_run=true",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    err = result.stderr
    assert err.count("error:") == 1
    for key in ("lora.r", "train.learning_rate", "cluster.gpus_per_node"):
        assert key in err
    assert not (tmp_path / "logs").exists()


def test_misspelled_key_fails_before_anything_runs(tmp_path: Path) -> None:
    result = launch("lora.rank=8", cwd=tmp_path)
    assert result.returncode == 2
    assert "Could not override 'lora.rank'" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_sweep_without_multirun_is_refused() -> None:
    with pytest.raises(ConfigError, match="-m"):
        pipeline.compose_launch(["experiment=demo", "lora.r=8,16"], multirun=False)


def test_sweep_expands_to_points_and_rejects_a_bad_point_whole() -> None:
    launch_ = pipeline.compose_launch(["experiment=demo", "lora.r=8,16", "train.learning_rate=1e-4,2e-4"], True)
    # Hydra canonicalises swept floats (1e-4 -> 0.0001)
    assert [p.overrides for p in launch_.points] == [
        ["lora.r=8", "train.learning_rate=0.0001"], ["lora.r=8", "train.learning_rate=0.0002"],
        ["lora.r=16", "train.learning_rate=0.0001"], ["lora.r=16", "train.learning_rate=0.0002"],
    ]  # fmt: skip
    assert [p.cfg.lora.r for p in launch_.points] == [8, 8, 16, 16]
    with pytest.raises(ConfigError) as err:
        pipeline.compose_launch(["experiment=demo", "lora.r=8,0"], multirun=True)
    assert "2-point sweep rejected" in str(err.value)
    assert err.value.problems == [p for p in err.value.problems if p.startswith("point 1 (lora.r=0): lora.r")]


def test_cluster_cannot_be_swept() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.gpus_per_node cannot be swept"):
        pipeline.compose_launch(["cluster=coreweave_h200", "cluster.gpus_per_node=4,8"], multirun=True)


def _normalise(text: str, run_dir: Path) -> str:
    text = text.replace(str(run_dir), "<RUN_DIR>").replace(sys.executable, "<PYTHON>")
    return re.sub(r"'<PYTHON>'", "<PYTHON>", text)


@pytest.mark.parametrize("sweep", [False, True], ids=["single", "sweep"])
def test_golden_sbatch_coreweave_h200(sweep: bool, tmp_path: Path) -> None:
    overrides = ["cluster=coreweave_h200", "name=golden"]
    launch_ = pipeline.compose_launch([*overrides, "lora.r=8,16"] if sweep else overrides, multirun=sweep)
    run_dir = tmp_path / "logs" / "golden" / "20261125-000000"
    scripts = pipeline.render_scripts(launch_, run_dir)
    text = "\n".join(f"##### {stage}\n{script}" for stage, script in scripts)
    text = _normalise(text, run_dir)
    golden = GOLDEN / f"coreweave_h200_{'sweep' if sweep else 'single'}.sbatch"
    if os.environ.get("GPTOSS_HPC_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_sweep_value_of_the_wrong_type_names_point_and_key() -> None:
    with pytest.raises(ConfigError) as err:
        pipeline.compose_launch(["experiment=demo", "lora.r=4,abc"], multirun=True)
    assert err.value.problems[0].startswith("point 1 (lora.r=abc): lora.r:")


def test_fast_sweep_composition_equals_hydra_composing_each_point() -> None:
    from gptoss_hpc.config.io import compose_many

    overrides = ["experiment=demo", "lora.r=4,8", "train.learning_rate=1e-3,2e-3", "cluster.time=00:10:00"]
    fast = pipeline.compose_launch(overrides, multirun=True)
    batches, _ = pipeline.expand_overrides(overrides, multirun=True)
    slow = [pipeline.to_run_config(c) for c in compose_many(batches)]
    assert [p.cfg for p in fast.points] == slow


def test_dependencies_follow_the_stage_graph(tmp_path: Path) -> None:
    overrides = ["cluster=coreweave_h200", "stages=[train,merge,eval,serve,report]", "lora.r=8,16"]
    scripts = dict(pipeline.render_scripts(pipeline.compose_launch(overrides, multirun=True), tmp_path))
    dep = {s: re.search(r"--dependency='?([^'\n]*)", t) for s, t in scripts.items()}
    assert dep["train"] is None
    assert {s: m.group(1) for s, m in dep.items() if m} == {
        "merge": "aftercorr:<train-job-id>",
        "eval": "aftercorr:<merge-job-id>",
        "serve": "aftercorr:<merge-job-id>",
        "report": "afterany:<eval-job-id>",
    }
    single = dict(pipeline.render_scripts(pipeline.compose_launch(["cluster=coreweave_h200"]), tmp_path))
    assert "--dependency=afterok:<train-job-id>" in single["merge"].replace("'", "")
    assert "--array" not in single["train"]
