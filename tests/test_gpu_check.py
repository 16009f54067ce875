"""launchers/gpu_check.sh in its CI-sized CPU form (--cpu): the same phases as on the GPU box, with the tiny synthetic
checkpoint (python -m gptoss_hpc.synth_checkpoint --size tiny) and CPU ranks. Real: the script, the checkpoint
writer, the launcher with cluster=local, every stage, the bench, the server; faked: the GPU (CPU ranks, no GPU
memory column). Speed is not asserted; that the numbers are there and consistent is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.bench.gpu_check import main as gpu_check_main

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *phases: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "SLURM_"))}
    env["OUT"] = str(out)  # as on the device machine
    env["PYTHON"] = sys.executable
    # Fake: nvidia-smi (no GPU here), reporting 3 GPUs' memory.used in MiB; the check samples it each second and
    # books the largest under the stage then RUNNING (pNNN/status/<stage>.json)
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '1024\\n3072\\n2048\\n'\n")
    fake.chmod(0o755)
    env["PATH"] = f"{fake.parent}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(REPO / "launchers" / "gpu_check.sh"), "--cpu", "--work", str(tmp_path / "work"),
         "--budget-s", "1500", "--hard-s", "2300", *phases],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert (out / "gpu_check.md").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_check.json").read_text())


def _by_name(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in result["rows"]}


@pytest.mark.slow
def test_cpu_form_runs_every_phase_pipeline_configs_bench_two_ranks_and_a_knob_entry(tmp_path):
    # Every CPU phase in one run, as the launcher's header shows the CPU form: the phases share the run's one tiny
    # checkpoint (written once per process), so this costs one checkpoint and one start-up, not one per phase group.
    # --set: one override more on every run and its bench (a learning rate: it changes no row's shape)
    phases = ("pipeline", "configs", "bench", "2gpu", "knobs:1", "fit:20b@24", "long")
    proc, result = _run(tmp_path, "--set", "train.learning_rate=1e-4", *phases)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = _by_name(result)
    assert all(r["result"] == "pass" for r in result["rows"]), result["rows"]  # none failed, none left unrun
    assert [r["name"] for r in result["rows"]].count("synth_checkpoint ckpt-full") == 1  # shared by every phase

    # phase pipeline: train -> merge -> eval -> serve with the shipped defaults
    for name in ("shipped defaults", "merge: shipped defaults", "eval: shipped defaults",
                 "serve: shipped defaults (merged model)"):  # fmt: skip
        assert rows[name]["result"] == "pass", rows[name]
        assert rows[name]["wall_s"] > 0
    for name in ("shipped defaults", "merge: shipped defaults", "eval: shipped defaults"):
        assert rows[name]["peak_gpu_gib"] == 3.0, rows[name]  # the fake's largest GPU, 3072 MiB
    train = rows["shipped defaults"]
    assert train["train_tok_s"] > 0 and train["global_step"] == 4
    # real tokens per optimizer step never exceed the configured maximum (demo-sized: 2 x 256 tokens)
    assert 0 < train["real_tokens_per_step"] <= train["max_tokens_per_step"] == 512
    assert "| pipeline | shipped defaults | pass |" in proc.stdout  # the one table, printed
    assert (tmp_path / "out" / "gpu_check.md").read_text().count("| pass |") >= 5  # + the checkpoint row

    # phases configs + bench, 2gpu, knobs:1
    for name in ("train=default", "train=reference"):
        assert rows[name]["result"] == "pass" and rows[name]["train_tok_s"] > 0
        assert rows[name]["bench_tok_s"] > 0, rows[name]  # bench train for the same overrides, beside it
    two = rows["train=default x2 (one rank per GPU)"]
    assert two["result"] == "pass" and two["world_size"] == 2 and two["max_tokens_per_step"] == 2 * 512
    (knob,) = [r for r in result["rows"] if r["name"].startswith("knobs[1]")]
    assert knob["result"] == "pass"
    # the 2-rank run's per-GPU throughput is compared with the one-GPU bench
    assert "train/bench" in proc.stdout
    # phase fit: the card size reaches the launch, and the row names the setting the launch trained with (on CPU
    # train.fit_memory leaves it: the demo-sized stand-in's own 2 x 256)
    (fit,) = [r for r in result["rows"] if r["name"].startswith("fit: 20b shipped defaults on a 24 GiB card")]
    assert fit["result"] == "pass" and fit["gpu_memory_gib"] == 24.0 and "cluster.gpu_memory_gib=24" in fit["command"]
    assert fit["name"].endswith("(chose bfloat16 2x256 x GA 1)"), fit["name"]
    launched = [r for r in result["rows"] if r.get("command", "").startswith("-m gptoss_hpc.launch")]
    assert len(launched) >= 8 and all("train.learning_rate=1e-4" in r["command"] for r in launched)
    assert "train.learning_rate=1e-4" in rows["train=default"]["bench_command"]

    # phase long (issue 27): attention vs the exact reference, a bench row at one length, the train stage on a
    # long-row mix with no train.max_length, each with the plan's GiB, MFU counting attention and the cold start
    long = [r for r in result["rows"] if r["phase"] == "long"]
    assert [r["name"].split(" (")[0] for r in long] == [
        "attention vs exact reference",
        "bench train: one 256-token row per micro-batch",
        "train stage, shipped defaults, long rows: mix",
    ]
    attn, bench, train_long = long
    assert attn["long_check"]["loss_rel_err"] <= 1e-5 and attn["long_check"]["grad_rel_err"] <= 1e-4
    assert bench["bench_tok_s"] > 0 and bench["plan_gib"] > 0 and bench["mfu"] is not None
    assert bench["cold_start_s"] > 0
    assert train_long["train_tok_s"] > 0 and train_long["plan_gib"] > 0 and train_long["cold_start_s"] > 0
    assert train_long["train_max_length"] == 512  # the CPU stand-in's; on the GPU no train.max_length is given


def test_table_joins_phases_and_fails_on_a_failed_row(tmp_path, capsys):
    ok = {"rows": [{"phase": "configs", "name": "train=default", "result": "pass", "train_tok_s": 30000,
                    "bench_tok_s": 31000, "world_size": 1, "real_tokens_per_step": 16000,
                    "max_tokens_per_step": 16384}]}  # fmt: skip
    bad = {"rows": [{"phase": "pipeline", "name": "merge: shipped defaults", "result": "FAIL (FAILED)"}]}
    (tmp_path / "a.json").write_text(json.dumps(ok))
    (tmp_path / "b.json").write_text(json.dumps(bad))
    assert gpu_check_main(["table", str(tmp_path / "a.json")]) == 0
    row = "| configs | train=default | pass |  |  | 30,000 | 31,000 | 0.97 | 16,000; 16,384 |"
    assert row in capsys.readouterr().out
    assert gpu_check_main(["table", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    two = {"rows": [{"phase": "2gpu", "name": "train=default x2 (one rank per GPU)", "result": "pass",
                     "train_tok_s": 57000, "world_size": 2}]}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(two))
    capsys.readouterr()
    assert gpu_check_main(["table", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 0
    assert "28,500 tok/s per GPU = 95% of one GPU (30,000)" in capsys.readouterr().out


def test_set_overrides_reach_the_bench_phase(tmp_path, monkeypatch):
    """`--set` applies to every run of a phase and to its bench: the first GPU call of 2026-11-30 (f7aac5b) ran `--set
    model.experts_dtype=mxfp4 ... bench:default` and got the bf16 bench, because phase_bench dropped them."""
    import time

    from gptoss_hpc.bench import gpu_check

    seen: list[list[str]] = []
    monkeypatch.setattr(gpu_check, "bench_for", lambda c, phase, ov, row: seen.append(ov))
    sets = ["model.experts_dtype=mxfp4", "train.gradient_accumulation_steps=4"]
    c = gpu_check.Check(cpu=True, work=tmp_path, budget_s=100, hard_s=200, steps=2, warmup=1, started=time.time(),
                        rows=[], extra=sets)  # fmt: skip
    gpu_check.phase_bench(c, "default")
    assert len(seen) == 1 and seen[0][-2:] == sets
