"""The sweep report on hand-made run dirs (files as train/merge/eval and submitit leave them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config
from gptoss_hpc.paths import RunPaths
from gptoss_hpc.stages.report import PLOTS, ReportError, main
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OOM = "OutOfMemoryError: CUDA out of memory. Tried to allocate 13.00 GiB"


def _status(point: Path, stage: str, state: str, **extra) -> None:
    (point / "status").mkdir(parents=True, exist_ok=True)
    (point / "status" / f"{stage}.json").write_text(json.dumps({"stage": stage, "state": state, **extra}))


def _eval_json(loss: float, base_loss: float, adherence: float) -> dict:
    def block(value: float, a: float) -> dict:
        return {"loss": value, "perplexity": 2.718**value, "format_validity": 1.0, "language_adherence": a, "rows": 4}

    return {"base": block(base_loss, 0.0), "finetuned": block(loss, adherence), "eval_loss": loss}


def make_run(root: Path, overrides: list[list[str]], *, array: bool = True) -> RunPaths:
    run = RunPaths(root / "logs" / "sweep" / "20261125-090000")
    points = []
    for i, ov in enumerate(overrides):
        cfg = to_run_config(compose(["experiment=demo", *ov]))
        save_run_config(cfg, run.point(i).config)
        points.append(PointRecord(index=i, overrides=ov, dir=run.point(i).root.name))
    idx = [p.index for p in points]
    jobs = [
        JobRecord("train", "1001", array, idx, "slurm/train"),
        JobRecord("merge", "1002", array, idx, "slurm/merge", dependency="aftercorr:1001"),
        JobRecord("eval", "1003", array, idx, "slurm/eval", dependency="aftercorr:1002"),
        JobRecord("report", "1004", False, [], "slurm/report", dependency="afterany:1003"),
    ]
    Manifest("sweep", "2026-11-25T09:00:00", "slurm", str(run.root), points, jobs).save()
    return run


def complete_point(run: RunPaths, i: int, loss: float, adherence: float) -> None:
    p = run.point(i).root
    p.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - 0.2 * s, "learning_rate": 2e-4}) + "\n" for s in range(1, 6))
        + '{"step": 6, "lo'  # a torn last line, as a killed job leaves it
    )
    (p / "eval").mkdir()
    (p / "eval" / "eval.json").write_text(json.dumps(_eval_json(loss, 2.5, adherence)))
    for stage in ("train", "merge", "eval"):
        _status(p, stage, "COMPLETED")


def test_report_marks_failed_point_and_writes_outputs(tmp_path: Path):
    run = make_run(tmp_path, [["lora.r=8", "train.learning_rate=2e-4"], ["lora.r=16", "train.learning_rate=1e-3"]])
    complete_point(run, 0, loss=1.25, adherence=0.75)
    _status(run.point(1).root, "train", "FAILED", error=OOM, traceback="Traceback ...")

    md_path = main(run.root)
    assert md_path == run.report / "report.md"
    md = md_path.read_text()
    data = json.loads((run.report / "report.json").read_text())
    for name in PLOTS:
        assert (run.report / name).read_bytes()[:8] == PNG_MAGIC
        assert f"({name})" in md

    p0, p1 = data["points"]
    assert p0["state"] == "ok" and p0["lora_r"] == 8 and p0["learning_rate"] == 2e-4
    assert p0["losses"] == pytest.approx([2.8, 2.6, 2.4, 2.2, 2.0]) and p0["final_train_loss"] == pytest.approx(2.0)
    assert p0["eval"]["finetuned"]["loss"] == 1.25
    assert p1["state"] == "failed" and p1["lora_r"] == 16
    assert p1["stages"] == {"train": "FAILED", "merge": "MISSING", "eval": "MISSING"}
    assert f"train: {OOM}" in p1["errors"]
    assert "merge: did not run (an earlier stage failed)" in p1["errors"]
    assert (data["points_ok"], data["points_failed"], data["best_point"]) == (1, 1, "p000")

    assert "## Failed points" in md and "### p001 (lora.r=16 train.learning_rate=1e-3)" in md
    assert OOM in md and "**FAILED**" in md
    row0 = next(line for line in md.splitlines() if line.startswith("| p000"))
    assert "| ok |" in row0 and "| 1.25 |" in row0 and "| 0.75 |" in row0


def test_missing_status_falls_back_to_slurm_log_tail(tmp_path: Path):
    run = make_run(tmp_path, [["lora.r=8"], ["lora.r=16"]])
    complete_point(run, 0, loss=1.5, adherence=0.5)
    p1 = run.point(1).root
    _status(p1, "train", "COMPLETED")
    p1.joinpath("metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    _status(p1, "merge", "RUNNING")  # killed before it could record FAILED
    log_dir = run.slurm("merge")
    log_dir.mkdir(parents=True)
    (log_dir / "1002_1_0_log.err").write_text(
        "loading...\nslurmstepd: error: *** JOB 1002 CANCELLED DUE TO TIME LIMIT ***\n"
    )
    (log_dir / "1002_0_0_log.err").write_text("point 0's log, not ours\n")

    main(run.root)
    p = json.loads((run.report / "report.json").read_text())["points"][1]
    assert p["state"] == "failed" and p["stages"]["merge"] == "RUNNING"
    text = "\n".join(p["errors"])
    assert "TIME LIMIT" in text and "1002_1_0_log.err" in text and "not ours" not in text
    assert "eval: no status file" in text


def test_report_fails_when_no_point_has_results_but_still_writes(tmp_path: Path):
    run = make_run(tmp_path, [["lora.r=8"], ["lora.r=16"]])
    for i in (0, 1):
        _status(run.point(i).root, "train", "FAILED", error="DataError: no usable rows")
    with pytest.raises(ReportError, match="no point"):
        main(run.root)
    md = (run.report / "report.md").read_text()
    assert md.count("DataError: no usable rows") == 2


def test_cli_exit_codes(tmp_path: Path):
    run = make_run(tmp_path, [["lora.r=8"]], array=False)
    complete_point(run, 0, loss=1.0, adherence=1.0)
    ok = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.report", str(run.root)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(run.report / "report.md")
    bad = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.report", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1 and "launch.json" in bad.stderr
